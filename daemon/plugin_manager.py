"""The plugin manager is built by a function; the core calls hooks only through the typed `Hooks` facade."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pluggy

from daemon import hookspecs
from daemon.config import ConfigError, parse_section
from daemon.hookspecs import PROJECT
from daemon.logs import short

if TYPE_CHECKING:
    from daemon.augment import Distortion
    from daemon.backbone import Backbone
    from daemon.calibration import Calibrator
    from daemon.config import AugmentationConfig, BackboneConfig, Config, TrainingConfig
    from daemon.dataset import Dataset
    from daemon.events import FileEvent
    from daemon.head import Head
    from daemon.metrics import Metrics
    from daemon.novelty import NoveltyScore
    from daemon.registry import ModelVersion
    from daemon.results import ClassificationResult
    from daemon.retrain_policy import RetrainState

log = logging.getLogger(__name__)

#: Built-in plugins, registered like third-party ones; listed here too so a source checkout without the
#: installed entry points still works.
DEFAULT_PLUGINS = (
    "plugins.pillow_decoder",
    "plugins.path_filter",
    "plugins.quiet_period",
    "plugins.softmax_head",
    "plugins.file_sinks",
    "plugins.inception_v3",
    "plugins.efficientnet_lite0",
    "plugins.plots",
    "plugins.distortions",
    "plugins.tensorboard_summaries",
    "plugins.temperature_scaling",
    "plugins.mahalanobis_novelty",
)
#: The plugin the daemon registers itself once it runs (`App`): it can be disabled like any other.
PUBLISHER = "publisher"


def make_plugin_manager(disabled: Iterable[str] = (), extra: Iterable[object] = (),
                        settings: Mapping[str, Mapping[str, Any]] | None = None) -> pluggy.PluginManager:
    """Register built-ins, then entry-point plugins, then `extra` objects; `disabled` names are blocked (a name
    that is none of them raises `ConfigError` naming `plugins.disable[i]`).
    Then each plugin that declares settings gets its section of `settings` (`config.plugins.settings`);
    a section for no such plugin, or a bad value, raises `ConfigError` naming `plugins.<name>...`."""
    disabled, extra = list(disabled), list(extra)
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    known = ({module_name.rsplit(".", 1)[1] for module_name in DEFAULT_PLUGINS} | {PUBLISHER}
             | {entry.name for entry in importlib.metadata.entry_points(group=PROJECT)}
             | {pm.get_canonical_name(plugin) for plugin in extra})
    for i, name in enumerate(disabled):
        if name not in known:  # a misspelt name would leave the plugin it meant running, silently
            raise ConfigError(f"plugins.disable[{i}]: no plugin named {name!r} (plugins: {', '.join(sorted(known))})")
        pm.set_blocked(name)
    for module_name in DEFAULT_PLUGINS:
        name = module_name.rsplit(".", 1)[1]
        if not pm.is_blocked(name):
            pm.register(importlib.import_module(module_name), name=name)
    pm.load_setuptools_entrypoints(PROJECT)
    for plugin in extra:
        pm.register(plugin)
    pm.check_pending()
    _refuse_wrappers_of_isolated_hooks(pm)
    _configure(pm, settings or {}, disabled)
    return pm


def _configure(pm: pluggy.PluginManager, settings: Mapping[str, Mapping[str, Any]], disabled: list[str]) -> None:
    """Validate each plugin's settings against the class it registers, and hand them to it."""
    offered = {impl.plugin_name: impl.function() for impl in pm.hook.retraind_register_settings.get_hookimpls()}
    declared: dict[str, type] = {name: cls for name, cls in offered.items() if isinstance(cls, type)}
    receivers = {impl.plugin_name: impl for impl in pm.hook.retraind_configure.get_hookimpls()}
    for name in sorted(set(declared) ^ set(receivers)):
        plugin = pm.get_plugin(name)
        raise pluggy.PluginValidationError(plugin, f"plugin {name}: retraind_register_settings and "
                                           "retraind_configure go together (declare settings, receive them)")
    for name in settings:
        if name not in declared and name not in disabled:
            raise ConfigError(f"plugins.{name}: no loaded plugin of that name takes settings (plugins with "
                              f"settings: {', '.join(sorted(declared)) or 'none'}; `plugins.disable` lists "
                              "plugins not to load)")
    for name, cls in declared.items():
        values: object = parse_section(cls, settings.get(name), f"plugins.{name}")
        try:
            receivers[name].function(values)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(f"plugins.{name}: {exc}") from exc


#: Hooks the facade calls one implementation at a time (so one failure stops none of the others)
ISOLATED_HOOKS = ("retraind_write_model_artifacts", "retraind_on_model_published", "retraind_on_result",
                  "retraind_on_file_event", "retraind_on_rejected", "retraind_on_training_pending")


def _refuse_wrappers_of_isolated_hooks(pm: pluggy.PluginManager) -> None:
    """A wrapper around an isolated hook would never run (nothing drives its generator): refuse it loudly."""
    for hook_name in ISOLATED_HOOKS:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.wrapper or impl.hookwrapper:
                raise pluggy.PluginValidationError(
                    impl.plugin, f"plugin {impl.plugin_name}: {hook_name} is called once per plugin, in "
                    "isolation; it cannot be a wrapper or hookwrapper")


def _subject(kwargs: dict[str, Any]) -> str:
    """What a notification was about, in a few words for a log line: the file and a short id, the event's
    path or the model's number; never a repr of the result or the config (kilobytes each)."""
    if "result" in kwargs:
        result = kwargs["result"]
        return f"{result.source.name} (result {result.id[:8]})"
    if "event" in kwargs:
        return str(kwargs["event"].path)
    if "version" in kwargs:
        return f"model {kwargs['version'].number}"
    return str(kwargs.get("path", "-"))


class Hooks:
    """Typed calls into the plugins; notification hooks are isolated so one failing plugin stops nothing."""

    def __init__(self, pm: pluggy.PluginManager, metrics: Metrics | None = None) -> None:
        self.pm = pm
        self._metrics = metrics
        self._failures_seen: set[tuple[str, str, str]] = set()
        if metrics is not None:
            metrics.known_plugins([(name, impl.plugin_name) for name in ISOLATED_HOOKS
                                   for impl in getattr(pm.hook, name).get_hookimpls()])

    @classmethod
    def of(cls, config: Config, extra: Iterable[object] = (), metrics: Metrics | None = None) -> Hooks:
        """The plugins `config` asks for (`plugins.disable`, each plugin's settings) plus `extra` objects."""
        return cls(make_plugin_manager(config.plugins.disable, extra, config.plugins.settings), metrics)

    def _notify(self, hook_name: str, **kwargs: Any) -> list[Exception]:
        """Call every implementation separately: pluggy would stop at the first exception. Returns what the
        failing ones raised (already logged and counted)."""
        caller = getattr(self.pm.hook, hook_name)
        errors: list[Exception] = []
        for impl in reversed(caller.get_hookimpls()):
            try:
                impl.function(*(kwargs[arg] for arg in impl.argnames))
            except Exception as exc:  # noqa: BLE001 - logged by _log_failure (traceback the first time), counted
                errors.append(exc)
                self._log_failure(hook_name, impl.plugin_name, kwargs, exc)
                if self._metrics is not None:
                    self._metrics.plugin_errors.labels(hook=hook_name, plugin=impl.plugin_name).inc()
        return errors

    def _log_failure(self, hook_name: str, plugin: str, kwargs: dict[str, Any], exc: Exception) -> None:
        """One short line naming the plugin, the hook and the item; the traceback only the first time a plugin
        fails in a hook with an exception of that type. A failing sink is retried, and each retry must not
        repeat the traceback, whatever the message holds (a path with a fresh temporary name, a repr)."""
        kind = (hook_name, plugin, type(exc).__name__)
        first = kind not in self._failures_seen
        if first:
            if len(self._failures_seen) > 1000:
                self._failures_seen.clear()
            self._failures_seen.add(kind)
        log.error("plugin %s failed in %s for %s: %s", plugin, hook_name, _subject(kwargs), short(exc),
                  exc_info=first)

    def make_backbone(self, config: BackboneConfig, cache_dir: Path) -> Backbone | None:
        return self.pm.hook.retraind_make_backbone(config=config, cache_dir=cache_dir)  # type: ignore[no-any-return]

    def decode_image(self, data: bytes, size: tuple[int, int], max_pixels: int,
                     preprocessing: str) -> np.ndarray | None:
        return self.pm.hook.retraind_decode_image(  # type: ignore[no-any-return]
            data=data, size=size, max_pixels=max_pixels, preprocessing=preprocessing)

    def preprocessing_versions(self) -> frozenset[str]:
        """The preprocessing versions the decoder plugins make (`retraind_preprocessing_versions`)."""
        lists: list[list[str]] = self.pm.hook.retraind_preprocessing_versions()
        return frozenset(version for versions in lists for version in versions)

    def accept_path(self, path: Path, area: str) -> bool:
        return self.pm.hook.retraind_accept_path(path=path, area=area) is not False

    def should_retrain(self, state: RetrainState) -> bool:
        return bool(self.pm.hook.retraind_should_retrain(state=state))

    def on_training_pending(self) -> None:
        self._notify("retraind_on_training_pending")

    def train_head(self, dataset: Dataset, config: TrainingConfig) -> Head | None:
        return self.pm.hook.retraind_train_head(dataset=dataset, config=config)  # type: ignore[no-any-return]

    def fit_calibrator(self, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
        found: Calibrator = self._required("retraind_fit_calibrator", "temperature_scaling", logits=logits,
                                           labels=labels)
        return found

    def load_calibrator(self, name: str, directory: Path) -> Calibrator:
        found: Calibrator = self._required("retraind_load_calibrator", f"calibrator {name!r}", name=name,
                                           directory=directory)
        return found

    def fit_novelty(self, x: np.ndarray, labels: np.ndarray) -> NoveltyScore:
        found: NoveltyScore = self._required("retraind_fit_novelty", "mahalanobis_novelty", x=x, labels=labels)
        return found

    def held_out_scorer(self, novelty: NoveltyScore, x: np.ndarray,
                        labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """A function scoring a group's rows (int64 row indices into `x`) by a score like `novelty` fitted
        without them: the plugin's shortcut, else one `fit_novelty` per group."""
        found: Callable[[np.ndarray], np.ndarray] | None = self.pm.hook.retraind_held_out_scorer(
            novelty=novelty, x=x, labels=labels)
        if found is not None:
            return found

        def refit(group: np.ndarray) -> np.ndarray:
            keep = np.ones(len(labels), dtype=bool)
            keep[group] = False
            return self.fit_novelty(x[keep], labels[keep]).score(x[group])

        return refit

    def load_novelty(self, name: str, directory: Path) -> NoveltyScore:
        found: NoveltyScore = self._required("retraind_load_novelty", f"novelty score {name!r}", name=name,
                                             directory=directory)
        return found

    def _required(self, hook_name: str, provider: str, **kwargs: Any) -> Any:
        """A firstresult hook that some plugin must answer; RuntimeError naming `provider` when none did."""
        result = getattr(self.pm.hook, hook_name)(**kwargs)
        if result is None:
            raise RuntimeError(f"{hook_name}: no plugin answered (is the plugin for {provider} disabled?)")
        return result

    def route_result(self, result: ClassificationResult, config: Config) -> Path | None:
        return self.pm.hook.retraind_route_result(result=result, config=config)  # type: ignore[no-any-return]

    def register_distortions(self, config: AugmentationConfig) -> list[Distortion]:
        contributed: list[list[Distortion]] = self.pm.hook.retraind_register_distortions(config=config)
        return [distortion for group in contributed for distortion in group]

    def write_model_artifacts(self, version: ModelVersion, directory: Path, dataset: Dataset,
                              config: Config) -> None:
        self._notify("retraind_write_model_artifacts", version=version, directory=directory, dataset=dataset,
                     config=config)

    def on_model_published(self, version: ModelVersion) -> None:
        self._notify("retraind_on_model_published", version=version)

    def on_result(self, result: ClassificationResult, config: Config) -> list[Exception]:
        """Every sink runs; returns the exceptions of those that failed (an I/O error is retried)."""
        return self._notify("retraind_on_result", result=result, config=config)

    def on_file_event(self, event: FileEvent) -> None:
        self._notify("retraind_on_file_event", event=event)

    def on_rejected(self, path: Path, reason: str, message: str) -> None:
        self._notify("retraind_on_rejected", path=path, reason=reason, message=message)
