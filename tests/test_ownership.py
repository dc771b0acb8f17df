"""Who owns what, checked on the source: the core never imports a built-in plugin (it reaches them only through
hooks), never reads its own metrics back, and hangs no callbacks on other objects' attributes; the CLI only
parses and dispatches."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DAEMON = Path(__file__).resolve().parents[1] / "daemon"
MODULES = sorted(DAEMON.glob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_never_imports_a_builtin_plugin(path: Path) -> None:
    plugins = sorted(name for name in _imported(_tree(path)) if name == "plugins" or name.startswith("plugins."))
    assert not plugins, f"{path.name} imports {plugins}: reach a plugin through a hook (daemon/hookspecs.py)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_core_never_reads_its_own_metrics_back(path: Path) -> None:
    calls = [node.lineno for node in ast.walk(_tree(path))
             if isinstance(node, ast.Attribute) and (node.attr == "get_sample_value" or (
                 node.attr == "collect" and "registry" in ast.unparse(node.value).lower()))]
    assert not calls, f"{path.name}:{calls}: ask the part that knows, not the Prometheus registry"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_callbacks_hung_on_other_objects(path: Path) -> None:
    """`other.on_x = ...` (a callback assigned onto another object's attribute) hides who calls whom."""
    hung = [f"{ast.unparse(target)} (line {node.lineno})" for node in ast.walk(_tree(path))
            if isinstance(node, ast.Assign)
            for target in node.targets
            for element in (target.elts if isinstance(target, ast.Tuple) else [target])
            if isinstance(element, ast.Attribute) and element.attr.startswith("on_")
            and not (isinstance(element.value, ast.Name) and element.value.id == "self")]
    assert not hung, f"{path.name}: pass listeners to the constructor instead of {hung}"


def test_cli_only_parses_and_dispatches() -> None:
    """Signals, threads, the notify protocol and progress bars of the running service live in daemon/service.py."""
    imported = _imported(_tree(DAEMON / "cli.py"))
    for owned_elsewhere in ("signal", "threading", "daemon.notify", "tqdm.contrib.logging"):
        assert owned_elsewhere not in imported, f"daemon/cli.py imports {owned_elsewhere}"
