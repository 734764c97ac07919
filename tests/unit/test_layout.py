"""The package's layout: one folder per stage of a run, imports one way (docs/architecture.md).

Every ``import`` of the package, at module level or inside a function, is an edge; the
folders are ranked top to bottom, and an edge may stay in its folder or go down, never up.
Within a folder the modules form no circle. And every name the README, ``docs/`` and
``examples/`` tell users to import imports.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_pwdpo"
# top to bottom: a module may import its own folder and the folders below it
LAYERS = [
    "cli",
    "integrations",
    "evaluation",
    "training",
    "reference",
    "convert",
    "engine",
    "data",
    "config",
    "model",
    "losses",
    "platform",
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports (a package's ``__init__`` counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target not in MODULES and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != name and target != "megatron_pwdpo":
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _folder(name: str) -> str:
    """``megatron_pwdpo.training.loop`` -> ``training``; ``megatron_pwdpo.cli`` -> ``cli``."""
    return name.split(".")[1] if name != "megatron_pwdpo" else "cli"


def test_every_module_lives_in_a_ranked_folder():
    folders = {_folder(name) for name in MODULES}
    assert folders <= set(LAYERS), folders - set(LAYERS)
    top_level = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top_level == ["__init__.py", "cli.py"], top_level


def test_unit_tests_follow_the_package_folders():
    """``tests/unit/<folder>/`` for each package folder's tests; only tests of the whole
    project (the CLI, installs, the layout, the bench gate) sit in ``tests/unit`` itself."""
    unit = ROOT / "tests" / "unit"
    folders = {p.name for p in unit.iterdir() if p.is_dir() and p.name != "__pycache__"}
    package_folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders <= package_folders, folders - package_folders
    names = [p.name for p in unit.rglob("test_*.py")]
    # no __init__.py in tests: pytest imports test modules by their basename
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_imports_go_down_or_stay_in_their_folder():
    upward = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        for target in targets
        if LAYERS.index(_folder(target)) < LAYERS.index(_folder(name))
    ]
    assert not upward, "imports from a lower folder up to a higher one:\n" + "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles():
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))


def test_the_cycle_finder_finds_a_circle_and_the_ranking_an_upward_import():
    # the checks above can fail: a circle and an upward edge made up here are caught
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    fake = "megatron_pwdpo.losses.pointwise"
    assert LAYERS.index(_folder("megatron_pwdpo.training.loop")) < LAYERS.index(_folder(fake))


def test_losses_and_model_import_nothing_of_the_loop():
    below = {"model", "losses", "platform"}
    for name, targets in GRAPH.items():
        if _folder(name) in ("losses", "model"):
            assert {_folder(t) for t in targets} <= below, (name, targets)


# ---------------------------------------------------------------- documented imports
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "examples").rglob("*.md")),
    *sorted((ROOT / "examples").rglob("*.py")),
]
FROM_IMPORT = re.compile(r"from (megatron_pwdpo[\w.]*) import \(?([\w, \n]+?)\)?(?:\n|$)")
DOTTED = re.compile(r"`(megatron_pwdpo(?:\.\w+)+)")


def _documented() -> set[tuple[str, str | None]]:
    """(module, name) for ``from M import a, b`` lines and `M.name` references."""
    found: set[tuple[str, str | None]] = set()
    for path in DOCUMENTS:
        text = path.read_text()
        for module, names in FROM_IMPORT.findall(text):
            for raw in names.replace("\n", " ").split(","):
                if raw.strip():
                    found.add((module, raw.split(" as ")[0].strip()))
        for dotted in DOTTED.findall(text):
            found.add((dotted, None))
    return found


DOCUMENTED = sorted(_documented(), key=str)


def test_the_documents_name_imports():
    modules = {m for m, _ in DOCUMENTED}
    assert "megatron_pwdpo.integrations.megatron_lm" in modules  # the example's hooks
    assert ("megatron_pwdpo.config", "load_config") in DOCUMENTED and len(DOCUMENTED) >= 15


@pytest.mark.parametrize(("module", "name"), DOCUMENTED, ids=lambda v: str(v))
def test_each_documented_name_imports(module, name):
    if name is not None:
        # `from package import submodule` works without the package importing it first
        found = hasattr(importlib.import_module(module), name)
        if not found:
            try:
                importlib.import_module(f"{module}.{name}")
                found = True
            except ModuleNotFoundError:
                pass
        assert found, f"{module}.{name}"
        return
    # `a.b.c`: a module, or a name in the longest importable prefix
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return
    raise AssertionError(module)
