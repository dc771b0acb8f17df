"""Configuration: read once from YAML into frozen dataclasses, validated with errors that name the key.

A config error is a user mistake, not a bug: it is raised as `ConfigError` with one line saying which key is
wrong and what is allowed, and the CLI exits with status 78 (EX_CONFIG) so systemd does not restart-loop.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from daemon.ignore import DEFAULT_IGNORE, check_pattern

EX_CONFIG = 78
T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 does: PyYAML follows YAML 1.1, where a float needs a
    dot, so `1e-4` and `5e-1` were text (`training.l2[0]: expected float, got str '1e-4'`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"), list("-+0123456789."))


class ConfigError(Exception):
    """A config key is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class FoldersConfig:
    classes: str = "classes"
    inbox: str = "inbox"
    outbox: str = "outbox"
    review: str = "review"
    rejected: str = "rejected"
    state: str = "state"


@dataclass(frozen=True)
class BackboneConfig:
    name: str = "efficientnet_lite0"
    weights: str = "imagenet"
    engine: str = "auto"
    batch_size: int = 32
    threads: int = 0


@dataclass(frozen=True)
class SplitConfig:
    validation_percentage: float = 10.0
    testing_percentage: float = 10.0


@dataclass(frozen=True)
class TrainingConfig:
    quiet_period_seconds: float = 3.0
    l2: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])
    max_iterations: int = 500
    class_weighting: bool = True
    keep_versions: int = 5
    gate_tolerance: float = 0.0
    #: retrain.py's SGD knobs, used by the optional mini-batch optimizers (`sgd`, `adam`); L-BFGS ignores them
    optimizer: str = "lbfgs"
    how_many_training_steps: int = 4000
    learning_rate: float = 0.01
    train_batch_size: int = 100
    validation_batch_size: int = -1
    eval_step_interval: int = 10
    print_misclassified_test_images: bool = False
    tensorboard: bool = False


@dataclass(frozen=True)
class AugmentationConfig:
    """retrain.py's distortions, applied once per training image and cached (see daemon/augment.py)."""

    flip_left_right: bool = False
    random_crop: float = 0.0
    random_scale: float = 0.0
    random_brightness: float = 0.0
    variants_per_image: int = 2
    seed: int = 0


@dataclass(frozen=True)
class ClassifyConfig:
    """Which predictions are filed without asking (see daemon/trust.py).

    `target_precision`: the share of filed known-class images that must be right; each model version derives
    its review threshold from it. `confidence_threshold`: an explicit threshold on the calibrated top-1 score
    that overrides the derived one (1 sends every image to review); `None` (YAML `null` or the key left out)
    means "not set". `novelty`: also
    send images unlike every taught class to review (reason `unfamiliar`). `novelty_false_alarm_rate`: the
    share of known-class images the novelty gate may send to review, its threshold set at that conformal
    quantile of the out-of-fold known novelty scores; `None` (the default) sets it by leave-one-class-out
    Youden's J instead (daemon/novelty.py). Like `target_precision`, it is applied when a model version is
    fitted, and a changed value makes the serving model out of date (daemon/trainer.py retrains)."""

    top_k: int = 5
    target_precision: float = 0.9
    confidence_threshold: float | None = None
    novelty: bool = True
    novelty_false_alarm_rate: float | None = None


@dataclass(frozen=True)
class WatchConfig:
    settle_seconds: float = 1.0
    rescan_interval_seconds: float = 300.0
    max_image_pixels: int = 89_478_485
    max_file_bytes: int = 64 * 1024 * 1024
    #: names (globs) that are never labels nor images: what tools, trash cans, NAS systems and archives add
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    #: `auto` polls roots on network and FUSE file systems (no inotify events for other machines' writes)
    mode: str = "auto"
    poll_interval_seconds: float = 1.0


@dataclass(frozen=True)
class BatchingConfig:
    """TF Serving's batching parameters (`--batching_parameters_file`), for HTTP inference requests."""

    max_batch_size: int = 32
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 8


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9721
    max_body_bytes: int = 16 * 1024 * 1024
    #: `Host` names accepted besides the bound address and localhost (`*.example.org` matches sub-domains)
    allowed_hosts: list[str] = field(default_factory=list)
    #: a file holding the bearer token; required when `host` is not loopback (or `allow_unauthenticated`)
    token_file: str = ""
    allow_unauthenticated: bool = False
    #: paths answered without the token (probes; add "/metrics" for a scraper without credentials)
    paths_without_token: list[str] = field(default_factory=lambda: ["/healthz", "/readyz"])
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    keep_alive_seconds: float = 5.0
    backlog: int = 2048
    batching: BatchingConfig = field(default_factory=BatchingConfig)


@dataclass(frozen=True)
class PublishConfig:
    """Every promoted version exported to serving fleets' folders (daemon/publish.py); an empty path is off.
    Relative paths are taken from the config file's folder."""

    tf_serving_base_path: str = ""
    triton_model_repository: str = ""
    #: Triton's `max_batch_size` and its dynamic batcher's queue delay (TF Serving's batching names)
    max_batch_size: int = 32
    batch_timeout_micros: int = 1000


@dataclass(frozen=True)
class PluginsConfig:
    """`plugins.disable` names plugins not to load; every other key under `plugins:` is a plugin's name and
    holds that plugin's own settings, kept raw here and checked against the settings class the plugin
    declares (`retraind_register_settings`) when the plugins are loaded (`daemon/plugin_manager.py`)."""

    disable: list[str] = field(default_factory=list)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    data_root: Path = Path("data")
    folders: FoldersConfig = field(default_factory=FoldersConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    log_level: str = "INFO"

    def folder(self, name: str) -> Path:
        """Absolute path of one of the configured folders (`classes`, `inbox`, ..., `state`)."""
        return self.data_root / str(getattr(self.folders, name))


_RANGES: dict[str, tuple[float, float]] = {
    "backbone.batch_size": (1, 4096),
    "backbone.threads": (0, 1024),
    "split.validation_percentage": (0, 100),
    "split.testing_percentage": (0, 100),
    "training.quiet_period_seconds": (0, 86400),
    "training.max_iterations": (1, 100_000),
    "training.keep_versions": (1, 1000),
    "training.gate_tolerance": (0, 1),
    "training.how_many_training_steps": (1, 10**7),
    "training.learning_rate": (1e-9, 100),
    "training.train_batch_size": (1, 10**7),
    "training.validation_batch_size": (-1, 10**7),
    "training.eval_step_interval": (1, 10**7),
    "augmentation.random_crop": (0, 100),
    "augmentation.random_scale": (0, 100),
    "augmentation.random_brightness": (0, 99),
    "augmentation.variants_per_image": (0, 100),
    "augmentation.seed": (0, 2**63 - 1),
    "classify.top_k": (1, 1000),
    "classify.target_precision": (0.5, 0.999),
    "classify.confidence_threshold": (0, 1),
    "classify.novelty_false_alarm_rate": (0, 0.5),  # a gate that turns away most known images sorts nothing
    "watch.settle_seconds": (0, 3600),
    "watch.rescan_interval_seconds": (0, 86400 * 7),
    "watch.max_image_pixels": (1, 10**10),
    "watch.max_file_bytes": (1, 10**12),
    "watch.poll_interval_seconds": (0.05, 3600),
    "http.port": (0, 65535),
    "http.max_body_bytes": (1, 10**10),
    "publish.max_batch_size": (1, 2**20),
    "publish.batch_timeout_micros": (0, 60_000_000),
    "http.header_timeout_seconds": (0.1, 3600),
    "http.body_timeout_seconds": (0.1, 3600),
    "http.keep_alive_seconds": (0.1, 3600),
    "http.backlog": (1, 65535),
    "http.batching.max_batch_size": (1, 4096),
    "http.batching.batch_timeout_micros": (0, 10**7),
    "http.batching.max_enqueued_batches": (1, 10**6),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "backbone.engine": ("auto", "keras", "tflite"),
    "training.optimizer": ("lbfgs", "sgd", "adam"),
    "watch.mode": ("auto", "events", "polling"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}


def _plugins(raw: Any) -> PluginsConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"plugins: expected a mapping, got {type(raw).__name__}")
    settings: dict[str, dict[str, Any]] = {}
    for name, section in raw.items():
        if name == "disable":
            continue
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"plugins.{name}: expected a mapping of that plugin's settings, got "
                              f"{type(section).__name__} (`plugins.disable` lists plugins not to load)")
        settings[str(name)] = dict(section or {})
    return PluginsConfig(_convert("plugins.disable", list[str], raw.get("disable", [])), settings)


def _convert(key: str, hint: Any, value: Any) -> Any:
    """Check `value` against the type hint `hint`, converting only where YAML is ambiguous (int → float, and a
    whole float → int: `max_file_bytes: 6.4e7`)."""
    if hint is PluginsConfig:
        return _plugins(value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    if origin is types.UnionType:  # `X | None`: null means "not set"
        (inner,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        return None if value is None else _convert(key, inner, value)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path string, got {type(value).__name__}")
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


#: retrain.py's convention: -1 means every image of the split; 0 would evaluate none.
_ALL_OR_COUNT = ("training.validation_batch_size",)


def _check(key: str, value: Any) -> None:
    if key == "training.l2" and (not value or min(value) < 0):
        raise ConfigError(f"{key}: give one or more L2 strengths >= 0, e.g. [0.0001, 0.001, 0.01]")
    if key == "watch.ignore":
        for problem in (check_pattern(f"{key}[{i}]", p) for i, p in enumerate(value)):
            if problem:
                raise ConfigError(problem)
    if key in _ALL_OR_COUNT and value == 0:
        raise ConfigError(f"{key}: 0 evaluates no images; use -1 for all of them or a positive count")
    if key in _RANGES and value is not None:
        low, high = _RANGES[key]
        if not low <= value <= high:
            raise ConfigError(f"{key}: {value!r} is out of range [{low}, {high}]")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")


def _build(cls: Any, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (allowed: {', '.join(sorted(known))})")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _convert(key, hints[name], value)
        _check(key, values[name])
    return cls(**values)


def parse_section(cls: type[T], raw: Any, key: str) -> T:
    """Validate one section of the config (a plugin's settings) into the frozen dataclass `cls`: unknown
    keys and wrong types are `ConfigError`s naming `key.<name>`; a missing section takes every default."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{key}: the settings class must be a dataclass, not {cls!r}")
    built: T = _build(cls, raw, key)
    return built


def _resolve_root(config: Config, base: Path) -> Config:
    """Paths made as the config documents them: `~` (or `~user`) at the start is a home folder, in every key
    that names a path; `data_root`, `backbone.weights`, `http.token_file` and the `publish` paths are relative
    to the config's folder (`base`), the `folders` to `data_root`."""
    folders = FoldersConfig(**{f.name: os.path.expanduser(getattr(config.folders, f.name))
                               for f in dataclasses.fields(FoldersConfig)})
    backbone = config.backbone
    if backbone.weights != "imagenet":
        backbone = dataclasses.replace(backbone, weights=_absolute(base, backbone.weights))
    config = dataclasses.replace(config, folders=folders, backbone=backbone)
    root = _absolute_path(base, str(config.data_root))
    if not root.parent.is_dir():
        raise ConfigError(f"data_root: parent folder {root.parent} does not exist; create it or fix the path")
    _check_folders(dataclasses.replace(config, data_root=root))
    if config.split.validation_percentage + config.split.testing_percentage >= 100:
        raise ConfigError("split: validation_percentage + testing_percentage must be below 100")
    http = config.http
    _check_http_lists(http)
    if http.token_file:
        http = dataclasses.replace(http, token_file=_absolute(base, http.token_file))
    elif not (http.allow_unauthenticated or is_loopback(http.host)):
        raise ConfigError(f"http.token_file: serving on {http.host!r} reaches beyond this machine; give a file "
                          "holding a bearer token (or set http.allow_unauthenticated: true)")
    publish = config.publish
    publish = dataclasses.replace(publish, tf_serving_base_path=_absolute(base, publish.tf_serving_base_path),
                                  triton_model_repository=_absolute(base, publish.triton_model_repository))
    return dataclasses.replace(config, data_root=root, http=http, publish=publish)


def _check_http_lists(http: HttpConfig) -> None:
    """Entries that can never match are config errors, not silence: the Host header's name is compared
    without its port (a scheme, a path or a port in an `allowed_hosts` entry would refuse that host for
    ever), and a request's path begins with '/' (`healthz` would leave the probe behind the token)."""
    for i, entry in enumerate(http.allowed_hosts):
        if not entry or entry != entry.strip() or any(c in entry for c in "/@[] ") or (
                ":" in entry and not _is_ip(entry)):
            raise ConfigError(f"http.allowed_hosts[{i}]: {entry!r} is not a host name; give names as a Host "
                              "header has them, without scheme, port or path: 'retraind.example.org', "
                              "'*.example.org'")
    for i, path in enumerate(http.paths_without_token):
        if not path.startswith("/"):
            raise ConfigError(f"http.paths_without_token[{i}]: {path!r} is not a path; paths begin with '/', "
                              "e.g. '/healthz'")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_folders(config: Config) -> None:
    """Each of the daemon's folders must be its own place: one folder under two names, one inside another
    (an outbox inside the inbox is taken in again without end; an inbox that is `classes/` moves the
    training images away), or one that is the data root holding them all, is a `ConfigError`."""
    names = [f.name for f in dataclasses.fields(FoldersConfig)]
    paths = {name: Path(os.path.normpath(config.folder(name))) for name in names}
    for name in names:
        if paths[name] == config.data_root:
            raise ConfigError(f"folders.{name}: is data_root itself ({config.data_root}), which holds every "
                              "other folder; give it a sub-folder")
    for i, name in enumerate(names):
        for other in names[i + 1:]:
            if paths[name] == paths[other]:
                raise ConfigError(f"folders.{other}: is the same folder as folders.{name} ({paths[name]}); "
                                  "give each folder its own place")
            for inner, outer in ((name, other), (other, name)):
                if paths[outer] in paths[inner].parents:
                    raise ConfigError(f"folders.{inner}: lies inside folders.{outer} ({paths[inner]}); give "
                                      "each folder its own place")


def _absolute_path(base: Path, path: str) -> Path:
    """A path from the config: `~` at its start is the home folder, and a relative one is relative to `base`."""
    return (base / os.path.expanduser(path)).resolve()


def _absolute(base: Path, path: str) -> str:
    """An optional path from the config, made absolute against the config's folder ("" stays "": off)."""
    return str(_absolute_path(base, path)) if path else ""


def is_loopback(host: str) -> bool:
    """True for `localhost` and the loopback addresses (127.0.0.0/8, ::1); wildcards and names are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_config(raw: Any, base: Path) -> Config:
    """Validate a decoded YAML document; relative paths are resolved against `base` (the config's folder)."""
    return _resolve_root(_build(Config, raw, ""), base)


def load_config(path: Path) -> Config:
    """Read and validate `path`; every problem is a `ConfigError` naming the key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # e.g. a comment saved as Latin-1 by an editor
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"config: {path} is not UTF-8 text: line {line} holds the byte 0x{data[exc.start]:02x}; "
                          "save the file as UTF-8") from exc
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is not None:
                _refuse_repeated_keys(node, "", path)
            raw = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {_yaml_problem(exc)}") from exc
    return parse_config(raw, path.parent.resolve())


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what: `line 12, column 1: found character '\\t' that cannot start any token`. PyYAML's first
    line is often only its context ("while scanning for the next token"), without the line."""
    if not (isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None):
        return str(exc).splitlines()[0]
    mark, where = exc.problem_mark, exc.context_mark
    context = f" ({exc.context} from line {where.line + 1})" if exc.context and where is not None else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}{context}"


def _refuse_repeated_keys(node: yaml.Node, prefix: str, path: Path) -> None:
    """A key written twice in one mapping is a `ConfigError` naming it and both lines (YAML parsers keep the
    last one silently, so the first one's settings would vanish, e.g. an `http:` section appended below the
    shipped config.yaml, which has one)."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_repeated_keys(item, f"{prefix}[{i}]", path)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.value == "<<":
            continue
        name = f"{prefix}.{key.value}" if prefix else str(key.value)
        line = key.start_mark.line + 1
        if key.value in seen:
            raise ConfigError(f"{name}: given twice in {path} (lines {seen[key.value]} and {line}); keep one")
        seen[key.value] = line
        _refuse_repeated_keys(value, name, path)

