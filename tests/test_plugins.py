"""Plugins: a third-party plugin is called through the real hooks; built-ins can be switched off by name;
one failing plugin stops neither the others nor the daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config
from daemon.hookspecs import hookimpl
from daemon.plugin_manager import DEFAULT_PLUGINS, make_plugin_manager
from daemon.results import ClassificationResult
from tests.conftest import seed_classes, wait_for, write_image


class Recorder:
    """A third-party plugin: observes results, routes 'skip-' files to its own folder, vetoes '.ignore'."""

    def __init__(self) -> None:
        self.results: list[ClassificationResult] = []
        self.published: list[int] = []

    @hookimpl
    def retraind_on_result(self, result: ClassificationResult, config: Config) -> None:
        self.results.append(result)

    @hookimpl
    def retraind_on_model_published(self, version: Any) -> None:
        self.published.append(version.number)

    @hookimpl
    def retraind_route_result(self, result: ClassificationResult, config: Config) -> Path | None:
        return config.data_root / "special" if result.source.name.startswith("special-") else None

    @hookimpl
    def retraind_accept_path(self, path: Path, area: str) -> bool | None:
        return False if path.suffix == ".ignore" else None


class Broken:
    @hookimpl
    def retraind_on_result(self, result: ClassificationResult, config: Config) -> None:
        raise RuntimeError("sink down")


def test_third_party_plugin_is_called(tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    recorder = Recorder()
    seed_classes(tmp_path)
    with run_app(extra=(Broken(), recorder)) as app:
        wait_for(lambda: recorder.published, what="a published model")
        write_image(data / "inbox" / "special-1.jpg", "red", seed=1)
        write_image(data / "inbox" / "plain.jpg", "blue", seed=2)
        write_image(data / "inbox" / "skip.ignore", "blue", seed=3)
        wait_for(lambda: len(recorder.results) == 2 and app.pipeline.idle.is_set() and not app.store.journal_open(),
                 what="two results despite the broken sink")
        assert (data / "special" / "special-1.jpg").exists()
        assert (data / "outbox" / "blue" / "plain.jpg").exists()
        assert (data / "results.jsonl").read_text().count("\n") == 2  # the built-in sink still ran
        assert (data / "inbox" / "skip.ignore").exists()
        failures = sum(s.value for m in app.metrics.registry.collect() if m.name == "retraind_plugin_errors"
                       for s in m.samples if s.name.endswith("_total"))
        assert failures == 2
    assert recorder.published == [1]


def test_builtins_are_registered_and_can_be_disabled() -> None:
    names = {name for name, _ in make_plugin_manager().list_name_plugin()}
    assert {m.rsplit(".", 1)[1] for m in DEFAULT_PLUGINS} <= names
    pm = make_plugin_manager(disabled=["file_sinks"])
    assert pm.get_plugin("file_sinks") is None and pm.is_blocked("file_sinks")


def test_builtins_are_declared_as_entry_points() -> None:
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group="retraind")}
    for module in DEFAULT_PLUGINS:
        assert declared.get(module.rsplit(".", 1)[1]) == module


def test_unknown_hook_in_plugin_is_refused() -> None:
    class Typo:
        @hookimpl
        def retraind_on_resutl(self, result: Any) -> None: ...

    with pytest.raises(Exception, match="unknown hook"):
        make_plugin_manager(extra=[Typo()])
