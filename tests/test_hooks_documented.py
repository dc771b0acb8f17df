"""Every hook in daemon/hookspecs.py, and every built-in plugin, is documented in README.md's Plugins section
(datasette's test_docs habit): a hook added without a word for users fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from daemon import hookspecs
from daemon.plugin_manager import DEFAULT_PLUGINS

README = Path(__file__).resolve().parents[1] / "README.md"
HOOKS = sorted(name for name in vars(hookspecs) if name.startswith(f"{hookspecs.PROJECT}_"))


def plugins_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Plugins\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no '## Plugins' section"
    return match.group(1)


def test_there_are_hooks() -> None:
    assert len(HOOKS) >= 10 and "retraind_on_result" in HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    assert re.search(rf"`{hook}[`(]", plugins_section()), f"document {hook} in README.md's Plugins section"


def test_documented_hooks_exist() -> None:
    named = set(re.findall(r"`(retraind_(?:make|decode|accept|should|train|register|write|on|route)_\w+)[`(]",
                           plugins_section()))
    assert named <= set(HOOKS), f"README.md documents hooks that do not exist: {sorted(named - set(HOOKS))}"


@pytest.mark.parametrize("plugin", [name.rsplit(".", 1)[1] for name in DEFAULT_PLUGINS])
def test_builtin_plugin_is_listed(plugin: str) -> None:
    assert f"`{plugin}`" in plugins_section(), f"list the built-in plugin {plugin} in README.md's Plugins section"
