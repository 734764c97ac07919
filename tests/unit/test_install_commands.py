"""The README's install commands, ``.ci/run``, ``constraints.txt`` and
``constraints-newest.txt`` agree with each other and with ``pyproject.toml`` (a drift here
breaks a fresh machine, not a test run)."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _pins(name: str = "constraints.txt") -> dict[str, str]:
    lines = (ROOT / name).read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {_canonical(name): version for name, version in pins}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _ci_readme_command() -> str:
    """The line after ``# --- the README's test command`` in ``.ci/run``."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(lines) if "--- the README's test command" in line)
    return lines[marker + 1].strip()


def _declared(*extras: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [
        *project["dependencies"],
        *(r for e in extras for r in project["optional-dependencies"][e]),
    ]


def test_ci_runs_the_readme_test_command():
    ci = _ci_readme_command()
    readme = (ROOT / "README.md").read_text()
    first_screen = readme[: readme.index("\n---\n")]
    assert ci.replace("pip install -q ", "pip install ") in first_screen
    assert first_screen.count("-c constraints.txt") == 2  # the train and the test command


def _assert_pins_satisfy(declared: list[str], constraints: str) -> None:
    pins = _pins(constraints)
    assert "torch" not in pins  # the commands pin it
    for text in declared:
        req = Requirement(text)
        name = _canonical(req.name)
        if name == "torch":
            assert req.specifier.contains("2.13.0"), text
            continue
        assert name in pins, f"{constraints} does not pin {req.name}"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {text}"


def test_constraints_satisfy_every_declared_range():
    _assert_pins_satisfy(_declared("hf", "plot", "tensorboard", "dev", "bench"), "constraints.txt")


def test_newest_constraints_satisfy_what_the_newest_environment_installs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0 -c constraints-newest.txt -e '.[dev]'" in ci
    _assert_pins_satisfy(_declared("hf", "plot", "tensorboard", "dev"), "constraints-newest.txt")


def test_declared_megatron_core_range_is_what_ci_tests():
    """Both ends of pyproject's range are the releases the two CI environments pin."""
    (text,) = [r for r in _declared() if Requirement(r).name == "megatron-core"]
    low, high = _pins()["megatron-core"], _pins("constraints-newest.txt")["megatron-core"]
    assert str(Requirement(text).specifier) == f"<={high},>={low}", text
    readme = (ROOT / "README.md").read_text()
    assert f"`megatron-core>={low},<={high}`" in readme  # Supported releases


def test_ci_newest_tests_exist():
    """Every test file and test of .ci/run's NEWEST_DIST exists (a rename fails here, in
    the README's environment too, not only when CI reaches the newest one)."""
    ci = (ROOT / ".ci" / "run").read_text()
    block = ci[ci.index("NEWEST_DIST=(") : ci.index("\n)\n", ci.index("NEWEST_DIST=("))]
    entries = re.findall(r"^\s+(tests/\S+)", block, flags=re.M)
    assert len(entries) >= 5, block
    for entry in entries:
        path, _, test = entry.partition("::")
        assert (ROOT / path).is_file(), entry
        if test:
            assert f"def {test}(" in (ROOT / path).read_text(), entry
