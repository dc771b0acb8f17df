"""Plugins: a third-party plugin is called through the real hooks; built-ins can be switched off by name;
one failing plugin stops neither the others nor the daemon; a plugin's own settings reach it validated."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import pytest

from daemon.config import Config, ConfigError, parse_config
from daemon.hookspecs import hookimpl
from daemon.plugin_manager import DEFAULT_PLUGINS, Hooks, make_plugin_manager
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


@dataclass(frozen=True)
class GreeterSettings:
    greeting: str = "hello"
    times: int = 1
    targets: list[str] = field(default_factory=list)


class Greeter:
    """A plugin with settings of its own, registered under the name `greeter`."""

    __name__ = "greeter"

    def __init__(self) -> None:
        self.received: list[GreeterSettings] = []

    @hookimpl
    def retraind_register_settings(self) -> type[GreeterSettings]:
        return GreeterSettings

    @hookimpl
    def retraind_configure(self, settings: GreeterSettings) -> None:
        if settings.times < 1:
            raise ValueError(f"times: {settings.times} is below 1")
        self.received.append(settings)


def test_plugin_settings_reach_the_plugin_validated(tmp_path: Path) -> None:
    greeter = Greeter()
    make_plugin_manager(extra=[greeter])  # no section: every default
    raw = {"plugins": {"disable": ["plots"], "greeter": {"greeting": "hi", "times": 2, "targets": ["a"]}}}
    config = parse_config(raw, tmp_path)
    Hooks.of(config, [greeter])  # what the daemon, a reload and the one-shot commands do
    assert greeter.received == [GreeterSettings(), GreeterSettings("hi", 2, ["a"])]


@pytest.mark.parametrize(("section", "message"), [
    ({"greeting": "hi", "time": 2}, "plugins.greeter.time: unknown key (allowed: greeting, targets, times)"),
    ({"times": "2"}, "plugins.greeter.times: expected int, got str '2'"),
    ({"targets": ["a", 1]}, "plugins.greeter.targets[1]: expected str, got int 1"),
    ({"times": 0}, "plugins.greeter: times: 0 is below 1"),
])
def test_bad_plugin_settings_name_the_key(tmp_path: Path, section: dict[str, Any], message: str) -> None:
    config = parse_config({"plugins": {"greeter": section}}, tmp_path)
    with pytest.raises(ConfigError) as raised:
        Hooks.of(config, [Greeter()])
    assert str(raised.value) == message


def test_settings_for_a_plugin_without_settings_are_refused(tmp_path: Path) -> None:
    config = parse_config({"plugins": {"plots": {"dpi": 300}}}, tmp_path)
    with pytest.raises(ConfigError, match=r"^plugins\.plots: no loaded plugin of that name takes settings"):
        Hooks.of(config)


def test_a_misspelt_plugin_to_disable_names_the_key(tmp_path: Path) -> None:
    """KIND: a config typo is one line naming the key. `plugins.disable: [file_sink]` (for `file_sinks`) was
    accepted and the plugin it meant kept running; any name that is no plugin (built-in, installed, given to
    the manager, or the daemon's `publisher`) is refused, and real names still disable."""
    config = parse_config({"plugins": {"disable": ["plots", "file_sink"]}}, tmp_path)
    with pytest.raises(ConfigError) as raised:
        Hooks.of(config)
    assert str(raised.value).startswith("plugins.disable[1]: no plugin named 'file_sink' (plugins: ")
    assert "file_sinks" in str(raised.value) and "publisher" in str(raised.value)
    pm = make_plugin_manager(disabled=["file_sinks", "publisher", "greeter"], extra=[Greeter()])
    assert pm.is_blocked("publisher") and pm.get_plugin("greeter") is None and pm.get_plugin("file_sinks") is None


def test_configure_without_declared_settings_is_a_plugin_error() -> None:
    class Half:
        @hookimpl
        def retraind_configure(self, settings: Any) -> None: ...

    with pytest.raises(pluggy.PluginValidationError, match="go together"):
        make_plugin_manager(extra=[Half()])


class Leaky:
    """A sink whose message holds the whole result and config, different on every attempt."""

    __name__ = "leaky"

    def __init__(self) -> None:
        self.attempts = 0

    @hookimpl
    def retraind_on_result(self, result: ClassificationResult, config: Config) -> None:
        self.attempts += 1
        raise KeyError(f"attempt {self.attempts}: {result!r} with {config!r}")


def test_a_failing_plugin_logs_one_short_line_per_attempt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Kind: a retried sink whose message holds reprs (kilobytes) logged them on every retry, each with a
    traceback. Each attempt is one line naming the plugin, the hook, the file and a short id; the traceback
    comes once."""
    config = parse_config({"plugins": {"disable": ["file_sinks"]}}, tmp_path)
    result = ClassificationResult("0123abcd" + "e" * 24, tmp_path / "inbox" / "IMG_0001.jpg", "f" * 64,
                                  (("red", 0.9), ("blue", 0.1)), 1, "tiny", "2026-01-01T00:00:00Z")
    hooks = Hooks.of(config, [Leaky()])
    assert len(repr(result)) + len(repr(config)) > 1000
    with caplog.at_level(logging.ERROR, logger="daemon.plugin_manager"):
        for _ in range(3):
            assert [type(exc) for exc in hooks.on_result(result, config)] == [KeyError]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 3
    for line in lines:
        assert line.startswith("plugin leaky failed in retraind_on_result for IMG_0001.jpg (result 0123abcd): "
                               "KeyError: "), line
        assert len(line) < 400 and "\n" not in line and "Config(" not in line
    assert [bool(record.exc_info) for record in caplog.records] == [True, False, False]


class Preparer:
    """Records, in order, the trainer's call to prepare and each retrain-policy question and head fit."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    @hookimpl
    def retraind_on_training_pending(self) -> None:
        self.calls.append(("pending", threading.current_thread().name))
        if self.fail:
            raise RuntimeError("cannot prepare")

    @hookimpl(tryfirst=True)
    def retraind_should_retrain(self, state: Any) -> bool | None:
        if not self.calls or self.calls[-1][0] != "policy":  # one entry per run of questions
            self.calls.append(("policy", threading.current_thread().name))
        return None

    @hookimpl(tryfirst=True)
    def retraind_train_head(self, dataset: Any, config: Any) -> None:
        if threading.current_thread().name == "retraind-trainer":  # the served head, not the fold heads
            self.calls.append(("head", threading.current_thread().name))


@pytest.mark.parametrize("fail", [False, True], ids=["prepares", "a-failing-plugin"])
def test_the_trainer_prepares_once_in_the_quiet_period_before_its_first_run(tmp_path: Path, run_app: Any,
                                                                             fail: bool) -> None:
    preparer, recorder = Preparer(fail), Recorder()
    seed_classes(tmp_path)
    with run_app(extra=(preparer, recorder)) as app:
        wait_for(lambda: recorder.published, what="a first model")
        write_image(tmp_path / "data" / "classes" / "red" / "red-new.jpg", "red", seed=999)
        wait_for(lambda: len(recorder.published) == 2 or app.trainer.runs == 2, what="a second run")
    kinds = [kind for kind, _ in preparer.calls]  # policy questions asked while images wait to be cached may come first
    pending, head = kinds.index("pending"), kinds.index("head")
    assert pending < head and kinds[pending + 1 : head] == ["policy"], kinds
    assert kinds.count("pending") == 1
    assert {thread for _, thread in preparer.calls} == {"retraind-trainer"}


class HeadSets:
    """Records the labels and training rows of each served head's fit (not the trust fit's fold heads)."""

    def __init__(self) -> None:
        self.fits: list[tuple[tuple[str, ...], int]] = []

    @hookimpl(tryfirst=True)
    def retraind_train_head(self, dataset: Any, config: Any) -> None:
        if not threading.current_thread().name.startswith("retraind-trust"):
            self.fits.append((dataset.labels, len(dataset.training_rows.y)))


def test_a_run_trains_on_what_was_committed_after_the_trainer_prepared(tmp_path: Path, tiny: Any) -> None:
    """`Trainer.prepare` loads the training set ahead of the run (in the quiet period); a run uses it only if
    nothing was committed since: images cached after it, through the daemon's store or another connection
    (another process's `retraind import`), are trained on."""
    from daemon.app import App
    from daemon.store import CatalogEntry, Store
    from tests.conftest import make_config

    rng = np.random.default_rng(3)
    recorder = HeadSets()
    app = App(make_config(tmp_path), extra_plugins=(tiny, recorder))
    try:
        backbone, dim = app.backbone.id, app.backbone.dim

        def add(store: Store, label: str, column: int) -> None:
            shas = [f"{label}{i:061d}" for i in range(20)]
            store.upsert_files([CatalogEntry(f"{label}/{i}.jpg", label, sha, 1, 1, True) for i, sha in enumerate(shas)])
            vectors = rng.gamma(1.0, 0.2, (20, dim)).astype(np.float32)
            vectors[:, column] += 3.0
            store.put_bottlenecks(backbone, [(sha, "", vector) for sha, vector in zip(shas, vectors)])

        add(app.store, "a", 0)
        add(app.store, "b", 1)
        app.trainer.prepare()
        add(app.store, "c", 2)  # the daemon's own store, after the load
        app.trainer.train_once()
        app.trainer.prepare()
        other = Store(app.store.path)
        try:
            add(other, "d", 3)  # another connection
        finally:
            other.close()
        app.trainer.train_once()
    finally:
        app.stop()
    assert [labels for labels, _ in recorder.fits] == [("a", "b", "c"), ("a", "b", "c", "d")]
