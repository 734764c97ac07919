"""Observability: ``megatron-pwdpo plot`` (PNG from metrics.jsonl, one-line errors) and the
optional TensorBoard / W&B writers of RunLog."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from megatron_pwdpo.cli import EXIT_BAD_INPUT, main
from megatron_pwdpo.config import ConfigError, LoggingConfig, RunConfig, load_config
from megatron_pwdpo.training.observe import RunLog, check_logging

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _entries(pairwise: bool = False) -> list[dict]:
    """An SFT stage (4 steps) then a preference stage (6 steps), evaluated every 2 steps."""
    reward_keys = (
        ("reward_chosen", "reward_rejected")
        if pairwise
        else (
            "reward_desirable",
            "reward_undesirable",
        )
    )
    acc_key = "pair_accuracy" if pairwise else "accuracy"
    out = [{"stage": "sft", "split": "eval", "step": 0, "iteration": 0, "loss": 7.6, "nll": 7.6}]
    for step in range(1, 5):
        out.append(
            {"stage": "sft", "step": step, "iteration": step, "loss": 7.6 - 0.5 * step, "lr": 1e-3}
        )
        if step % 2 == 0:
            out.append(
                {"stage": "sft", "split": "eval", "step": step, "iteration": step, "loss": 7 - step}
            )
    pref = "dpo" if pairwise else "pointwise_dpo"
    for step in range(0, 7):
        it = 4 + step
        if step:
            out.append(
                {
                    "stage": pref,
                    "step": step,
                    "iteration": it,
                    "loss": 0.69 - 0.01 * step,
                    acc_key: 0.5 + 0.02 * step,
                    "grad_norm": None if step == 3 else 1.0,  # non-finite values become null
                }
            )
        if step % 2 == 0:
            out.append(
                {
                    "stage": pref,
                    "split": "eval",
                    "step": step,
                    "iteration": it,
                    "loss": 0.69 - 0.005 * step,
                    acc_key: 0.5 + 0.01 * step,
                    reward_keys[0]: 0.01 * step,
                    reward_keys[1]: -0.02 * step,
                }
            )
    return out


def _write(run_dir: Path, entries: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def _check_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    height, width, channels = matplotlib.image.imread(path).shape
    assert 300 <= height <= 3000 and 400 <= width <= 3000 and channels in (3, 4)


# --------------------------------------------------------------------------- plot


def test_plot_writes_curves_png_with_every_panel(tmp_path, capsys):
    run = tmp_path / "run"
    _write(run, _entries())
    assert main(["plot", str(run)]) == 0
    _check_png(run / "curves.png")
    printed = capsys.readouterr().out
    for title in (
        "sft: loss",
        "pointwise_dpo: loss",
        "held-out accuracy",
        "held-out mean reward",
    ):
        assert title in printed


def test_plot_pairwise_metrics_and_out_path(tmp_path):
    from megatron_pwdpo.evaluation.plot import panels, plot_run, read_metrics

    run = tmp_path / "run"
    _write(run, _entries(pairwise=True))
    out, titles = plot_run(run, tmp_path / "figs" / "dpo.png")
    assert out == tmp_path / "figs" / "dpo.png" and not (run / "curves.png").exists()
    _check_png(out)
    assert titles == ["sft: loss", "dpo: loss", "held-out accuracy", "held-out mean reward"]
    by_title = {p.title: p for p in panels(read_metrics(run))}
    assert [line[0] for line in by_title["held-out accuracy"].lines] == ["dpo: pair_accuracy"]
    assert [line[0] for line in by_title["held-out mean reward"].lines] == [
        "dpo: chosen",
        "dpo: rejected",
    ]


def test_plot_skips_absent_panels(tmp_path):
    from megatron_pwdpo.evaluation.plot import plot_run

    run = tmp_path / "sft_only"
    _write(run, [e for e in _entries() if e["stage"] == "sft"])
    _, titles = plot_run(run)
    assert titles == ["sft: loss"]
    _check_png(run / "curves.png")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no metrics.jsonl in it"),
        ("", "metrics.jsonl: empty"),
        ("\n\n", "metrics.jsonl: empty"),
        (
            '{"stage": "sft", "step": 1, "iteration": 1, "loss": 1.0}\n{"stage": ',
            ":2: not valid JSON",
        ),
        ("[1, 2]\n", ":1: expected a JSON object"),
        ('{"stage": "sft", "loss": 1.0}\n', ":1: no integer 'iteration'"),
        ('{"stage": "sft", "step": 1, "iteration": 1, "lr": 0.1}\n', "nothing to plot"),
    ],
)
def test_plot_bad_run_dir_is_one_line_exit_2(tmp_path, capsys, content, message):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main(["plot", str(run)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-pwdpo: error: ") and "\n" not in err
    assert message in err and str(run) in err
    assert not (run / "curves.png").exists()


def test_plot_missing_directory(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "nope")]) == EXIT_BAD_INPUT
    assert "no such directory" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _write(run, _entries())
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    assert main(["plot", str(run)]) == EXIT_BAD_INPUT
    assert "pip install 'megatron-pwdpo[plot]'" in capsys.readouterr().err


# --------------------------------------------------------------------------- writers


def _logging(**kwargs) -> RunConfig:
    return RunConfig(logging=LoggingConfig(**kwargs))


def test_logging_config_section_loads_and_validates():
    config = load_config(None, ["logging.tensorboard=true", "logging.wandb_mode=online"])
    assert config.logging.tensorboard is True and config.logging.wandb_mode == "online"
    with pytest.raises(ConfigError, match="logging.wandb_mode: 'cloud' is not one of"):
        load_config(None, ["logging.wandb_mode=cloud"])


def test_no_writer_requested_imports_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    check_logging(RunConfig())
    check_logging(_logging(wandb=True, wandb_mode="disabled"))  # disabled: no writer at all


def test_missing_writer_packages_are_one_line_config_errors(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r"logging.tensorboard=true needs the tensorboard"):
        check_logging(_logging(tensorboard=True))
    with pytest.raises(ConfigError, match=r"logging.wandb=true needs the wandb package"):
        RunLog.check_logging(_logging(wandb=True))


def _read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {
        tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def test_tensorboard_writer_gets_train_and_eval_entries(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra")
    check_logging(_logging(tensorboard=True))
    log = RunLog(tmp_path, enabled=True, progress=False, logging=LoggingConfig(tensorboard=True))
    entries = _entries()
    for entry in entries:
        log.record(entry, show=False)
    log.close()
    scalars = _read_scalars(tmp_path / "tensorboard")
    assert scalars["sft/train/loss"] == [(i, round(7.6 - 0.5 * i, 6)) for i in range(1, 5)]
    assert scalars["sft/eval/loss"][0] == (0, 7.6)
    assert [s for s, _ in scalars["pointwise_dpo/eval/reward_desirable"]] == [4, 6, 8, 10]
    assert [s for s, _ in scalars["pointwise_dpo/train/grad_norm"]] == [5, 6, 8, 9, 10]  # no null
    assert "pointwise_dpo/train/iteration" not in scalars
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(entries)


def test_tensorboard_resume_purges_events_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra")
    config = LoggingConfig(tensorboard=True)
    log = RunLog(tmp_path, enabled=True, progress=False, logging=config)
    for it in range(1, 7):
        log.record({"stage": "sft", "step": it, "iteration": it, "loss": 1.0}, show=False)
    log.close()
    # resumed from the checkpoint at iteration 4: train() trims metrics.jsonl, then logs 5..
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()[:4]
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    log = RunLog(tmp_path, enabled=True, progress=False, logging=config)
    for it in range(5, 8):
        log.record({"stage": "sft", "step": it, "iteration": it, "loss": 2.0}, show=False)
    log.close()
    loss = _read_scalars(tmp_path / "tensorboard")["sft/train/loss"]
    assert loss == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 2.0), (6, 2.0), (7, 2.0)]


def test_wandb_writer_is_offline_by_default_and_tags_entries(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_MODE", "online")  # offline in the config wins over it
    (tmp_path / "config.yaml").write_text("loss:\n  beta: 0.1\n")
    log = RunLog(tmp_path, enabled=True, progress=False, logging=LoggingConfig(wandb=True))
    log.record({"stage": "sft", "step": 1, "iteration": 1, "loss": 2.5, "lr": 0.1}, show=False)
    log.record(
        {"stage": "sft", "split": "eval", "step": 1, "iteration": 1, "loss": float("nan")},
        show=False,
    )
    log.close()
    assert os.environ["WANDB_MODE"] == "offline"
    kind, kwargs = calls[0]
    assert kind == "init" and kwargs["mode"] == "offline" and kwargs["dir"] == str(tmp_path)
    assert kwargs["project"] == "megatron-pwdpo" and kwargs["config"] == {"loss": {"beta": 0.1}}
    assert calls[1:] == [("log", {"sft/train/loss": 2.5, "sft/train/lr": 0.1}, 1), ("finish",)]


def test_writers_only_on_rank_0(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would raise if rank 1 tried
    log = RunLog(tmp_path, enabled=False, progress=False, logging=LoggingConfig(wandb=True))
    log.record({"stage": "sft", "step": 1, "iteration": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()
