"""The README's install commands, ``.ci/run`` and ``constraints.txt`` agree with each other
and with ``pyproject.toml`` (a drift here breaks a fresh machine, not a test run)."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [line.split("==") for line in lines if line and not line.startswith("#")]
    return {_canonical(name): version for name, version in pins}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (ROOT / "README.md").read_text()
    first_screen = readme[: readme.index("\n---\n")]
    assert ci.replace("pip install -q ", "pip install ") in first_screen
    assert first_screen.count("-c constraints.txt") == 2  # the train and the test command


def test_constraints_satisfy_every_declared_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"]]
    for extra in ("hf", "plot", "tensorboard", "dev", "bench"):
        declared += project["optional-dependencies"][extra]
    pins = _pins()
    assert "torch" not in pins  # the commands pin it (a CPU build here)
    for text in declared:
        req = Requirement(text)
        name = _canonical(req.name)
        if name == "torch":
            assert req.specifier.contains("2.13.0"), text
            continue
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {text}"
