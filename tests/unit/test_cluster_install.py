"""The README's cluster section names files, options and extras that exist; the container
install script does what it says (run here with a stand-in pip and Transformer Engine);
the example configs' checkpoints fit the scratch the README states."""

import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from megatron_pwdpo.cli import build_parser
from megatron_pwdpo.config import RunConfig, parse_overrides
from megatron_pwdpo.config.load import _build, _merge

ROOT = Path(__file__).resolve().parents[2]


def _cluster_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Running on a Slurm cluster")
    end = readme.index("\n## ", start + 10)
    return readme[start:end]


def _commands() -> list[list[str]]:
    """Every shell command line in the section's ```bash blocks (comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", _cluster_section(), flags=re.S)
    lines = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            command: list[str] = []
            for tok in shlex.split(line):  # `a && b`, `a; b`: two commands
                if tok == "&&":
                    lines.append(command)
                    command = []
                elif tok.endswith(";"):
                    lines.append([*command, tok[:-1]])
                    command = []
                else:
                    command.append(tok)
            lines.append(command)
    return [c for c in lines if c]


def test_the_section_has_the_commands_a_cluster_user_runs():
    firsts = {c[0] for c in _commands()}
    assert {"sbatch", "docker", "enroot", "pip", "export"} <= firsts
    assert "nvcr.io/nvidia/pytorch:25.04-py3" in _cluster_section()


def _sbatch_cli_args(cmd: list[str]) -> tuple[str, list[str]]:
    """``sbatch [opts] slurm/X.sbatch ARGS`` -> (script, the CLI args it runs)."""
    script_at = next(i for i, tok in enumerate(cmd) if tok.startswith("slurm/"))
    script, args = cmd[script_at], cmd[script_at + 1 :]
    assert all(o.startswith("--") for o in cmd[1:script_at]), cmd
    if script == "slurm/train.sbatch":
        return script, ["train", "--config", *args]
    if script == "slurm/convert.sbatch":
        return script, ["convert", *args]
    if script == "slurm/precompute_ref.sbatch":
        return script, ["precompute-ref", "--config", args[0], "--out", *args[1:]]
    raise AssertionError(f"unknown script {script}")


def _fields(path: Path, overrides: list[str]) -> RunConfig:
    """The config file with the overrides, every key a real field (the platform checks of
    ``load_config``'s validation are left to tests/unit/config/test_example_configs.py)."""
    tree = _merge(yaml.safe_load(path.read_text()), parse_overrides(overrides))
    return _build(RunConfig, tree, "")


def test_every_sbatch_command_names_a_script_and_options_that_exist():
    sbatches = [c for c in _commands() if c[0] == "sbatch"]
    assert len(sbatches) >= 4
    for cmd in sbatches:
        script, cli = _sbatch_cli_args(cmd)
        assert (ROOT / script).is_file(), script
        args = build_parser().parse_args(cli)  # argparse exits on an unknown option
        if cli[0] == "train":
            assert (ROOT / args.config).is_file(), args.config
            _fields(ROOT / args.config, args.overrides)


def test_files_extras_and_variables_named_exist():
    section = _cluster_section()
    for path in set(re.findall(r"(?<![\w/])((?:slurm|examples|bench|tests)/[\w./-]+\w)", section)):
        if "*" not in path and "<" not in path:
            assert (ROOT / path).exists(), path
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for cmd in (c for c in _commands() if c[0] == "pip"):
        for tok in cmd:
            if tok.startswith(".["):
                assert set(tok[2:-1].split(",")) <= set(extras), tok
            if tok.startswith("constraints"):
                assert (ROOT / tok).is_file()
    common = (ROOT / "slurm" / "common.sh").read_text()
    for cmd in (c for c in _commands() if c[0] == "export"):
        name = cmd[1].split("=")[0]
        assert name in common, name
    docker = (ROOT / "slurm" / "Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/pytorch:25.04-py3" in docker
    assert "slurm/install_in_image.sh" in docker


def test_the_gpu_extra_asks_for_the_transformer_engine_the_recipes_need():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (te,) = [Requirement(r) for r in extras["gpu"] if r.startswith("transformer-engine")]
    assert not te.specifier.contains("2.1.0") and te.specifier.contains("2.2.0")
    assert any(Requirement(r).name == "transformers" for r in extras["hf"])


# ------------------------------------------------------------- install_in_image.sh

FAKE_PYTHON = textwrap.dedent(
    """\
    #!/bin/bash
    # Stand-in for the image's python where only a real image will do: `-m pip list` answers
    # an NGC image's packages; `-m pip install|check` and the final import check are logged
    # (with the files they read), not run. Everything else runs on the real interpreter.
    if [ "$1" = -m ] && [ "$2" = pip ] && [ "$3" = list ]; then
      printf '%s\\n' torch==2.7.0a0+79aa17489c.nv25.4 transformer_engine==2.2.0+c55e425 \\
        apex==0.1 numpy==1.26.4 nvidia-nccl-cu12==2.26.3 triton==3.2.0 requests==2.32.3
      exit 0
    fi
    if [ "$1" = -m ] && [ "$2" = pip ]; then
      echo "PIP ${*:3}" >> "$PIP_LOG"
      prev=""
      for arg in "$@"; do
        if [ "$prev" = -r ] || [ "$prev" = -c ]; then sed "s/^/  $prev /" "$arg" >> "$PIP_LOG"; fi
        prev=$arg
      done
      exit 0
    fi
    if [ "$1" = -c ] && [[ "$2" == "import megatron.core"* ]]; then
      echo "CHECK $2" >> "$PIP_LOG"
      exit 0
    fi
    exec {python} "$@"
    """
)


def _run_install(tmp_path, te_version: str) -> tuple[subprocess.CompletedProcess, str]:
    stub = tmp_path / "stub"
    (stub / "transformer_engine").mkdir(parents=True)
    (stub / "transformer_engine" / "__init__.py").write_text(f"__version__ = '{te_version}'\n")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.replace("{python}", sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "pip.log"
    env = {
        **os.environ,
        "PYTHON": str(fake),
        "PIP_LOG": str(log),
        "PIP_CONSTRAINT": "/image/pins.txt",
        "PYTHONPATH": os.pathsep.join([str(stub), str(ROOT)]),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "slurm" / "install_in_image.sh"), str(ROOT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, log.read_text() if log.exists() else ""


def test_install_in_image_refuses_transformer_engine_before_2_2(tmp_path):
    proc, pips = _run_install(tmp_path, "2.1.0+abc123")
    assert proc.returncode != 0 and "Transformer Engine 2.1.0 < 2.2" in proc.stderr
    assert pips == ""  # nothing installed


def test_install_in_image_keeps_the_image_packages_and_adds_the_rest(tmp_path):
    proc, pips = _run_install(tmp_path, "2.2.0+c55e425")  # a local version, as NGC's
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Transformer Engine 2.2.0" in proc.stdout
    lines = pips.splitlines()
    installs = [line for line in lines if line.startswith("PIP install")]
    assert installs[0] == "PIP install --no-cache-dir --no-deps megatron-core==0.16.1"
    assert installs[-1] == f"PIP install --no-cache-dir --no-deps {ROOT}"
    assert lines[-1].startswith("CHECK import megatron.core, megatron_pwdpo, transformer_engine")
    # the pure-Python requirements and [hf], never torch or megatron-core again ...
    required = [line.strip().split(" ", 1)[1] for line in lines if line.startswith("  -r ")]
    names = {Requirement(r).name for r in required}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name for r in project["dependencies"]} - {"torch", "megatron-core"}
    assert names == wanted | {"transformers"}
    # ... under a constraint file pinning what the image ships (not its other packages)
    pinned = {line.strip().split(" ", 1)[1] for line in lines if line.startswith("  -c ")}
    assert pinned == {
        "torch==2.7.0a0+79aa17489c.nv25.4",
        "transformer_engine==2.2.0+c55e425",
        "apex==0.1",
        "numpy==1.26.4",
        "nvidia-nccl-cu12==2.26.3",
        "triton==3.2.0",
    }


# ------------------------------------------------------------- storage budget


def _parameters(m) -> int:
    dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    attn = m.hidden_size * dim * (2 * m.num_attention_heads + 2 * groups)
    per_layer = attn + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size
    embeddings = m.vocab_size * m.hidden_size * (2 if m.untie_embeddings else 1)
    return m.num_layers * per_layer + embeddings + m.hidden_size


@pytest.mark.parametrize(
    ("name", "scratch_tb"), [("llama3-8b-2n8g-tp4pp2", 0.34), ("llama3-70b-8n8g-tp8pp4", 3.0)]
)
def test_example_checkpoints_fit_the_stated_scratch(name, scratch_tb):
    section = _cluster_section()
    assert f"**{scratch_tb:.2f}".rstrip("0").rstrip(".") in section or f"**{scratch_tb}" in section
    for path in sorted((ROOT / "examples").glob(f"{name}-*.yaml")):
        config = _fields(path, [])
        checkpoint_tb = 14 * _parameters(config.model) / 1e12  # bf16 weights + fp32 Adam
        on_disk = (config.train.keep_checkpoints + 1) * checkpoint_tb  # + the one written
        assert on_disk <= scratch_tb, (path.name, on_disk)
        assert config.train.steps // config.train.save_interval <= 6, path.name
