"""The one hook contract of retraind. Every hook a plugin may implement is declared, typed and documented here.

Built-in behaviour (in the top-level `plugins` package) implements these same hooks and is registered through
the same `retraind` entry-point group as a third-party plugin; built-in defaults are `trylast` so a user's
plugin that returns a result first replaces them. A plugin's own settings come from `plugins.<its name>` in
the config, declared by `retraind_register_settings` and handed over by `retraind_configure`. Verbs tell the shape: `make_*`/`decode_*`/`train_*` build
something (firstresult), `accept_*`/`should_*`/`route_*` decide (firstresult), `write_*` contributes to a
folder being built (every plugin), `on_*` notifies (every plugin; a failure is logged and counted, never
propagated). firstresult hooks stop at the first non-None result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pluggy

if TYPE_CHECKING:
    from daemon.augment import Distortion
    from daemon.backbone import Backbone
    from daemon.calibration import Calibrator
    from daemon.config import AugmentationConfig, BackboneConfig, Config, TrainingConfig
    from daemon.dataset import Dataset
    from daemon.events import FileEvent
    from daemon.head import Head
    from daemon.novelty import NoveltyScore
    from daemon.registry import ModelVersion
    from daemon.results import ClassificationResult
    from daemon.retrain_policy import RetrainState

PROJECT = "retraind"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def retraind_register_settings() -> type | None:
    """Declare the settings this plugin takes in `config.yaml` under `plugins.<plugin name>`: return a frozen
    dataclass whose fields, each with a default, are the allowed keys (typed like the rest of the config:
    bool, int, float, str, lists, `pathlib.Path`, nested dataclasses), or None for no settings.

    Called once per plugin on the main thread whenever the plugins are loaded (start-up, a config reload, the
    one-shot commands), before any other hook. The plugin's section is checked against the class like the
    rest of the config: an unknown key or a wrong type is a one-line config error naming
    `plugins.<name>.<key>` (exit status 78). A plugin that declares settings must implement
    `retraind_configure`, which receives them.
    """


@hookspec
def retraind_configure(settings: Any) -> None:
    """Receive this plugin's validated settings: an instance of the class its `retraind_register_settings`
    returned, built from its `plugins.<plugin name>` section (every default when there is none).

    Called on the main thread right after `retraind_register_settings`, again at every config reload, and
    only for plugins that declare settings. Raise `ValueError` to refuse a value (a URL without a scheme,
    a range): it becomes a config error `plugins.<name>: <your message>`, so name the key in it.
    """


@hookspec(firstresult=True)
def retraind_make_backbone(config: BackboneConfig, cache_dir: Path) -> Backbone | None:
    """Build the backbone named `config.name`, or return None when this plugin does not provide that name.

    Called on the main thread at every start-up and config reload (the daemon is rebuilt), and by the
    one-shot commands (`check-config`, `classify`, `export`).
    `cache_dir` is a folder under the state dir where downloaded weights may be cached. Raise
    `daemon.backbone.BackboneUnavailable` with a message naming the config key to set when the weights cannot
    be had. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def retraind_decode_image(data: bytes, size: tuple[int, int], max_pixels: int,
                          preprocessing: str) -> np.ndarray | None:
    """Decode encoded image bytes into a uint8 RGB array of shape (size[1], size[0], 3), or return None to
    let the next decoder try.

    `preprocessing` is the version (`v1`, `v2`, ...) named by the id of the backbone the pixels are for
    (`daemon.backbone.preprocessing_of`): a model trained on one version is served with that version while the
    store is re-cached under another. A decoder that makes one kind of pixels may leave the argument out; one
    that makes several returns None for a version it does not make, and lists those it makes in
    `retraind_preprocessing_versions`.

    Called from the `retraind-decode-cache` and `retraind-decode-inbox` pool threads (one per core each)
    at once for training and inbox images (so it must be thread-safe), on HTTP threads for classify requests, and on the trainer thread (at a larger `size`) for
    the distorted variants of training images. Raise
    `daemon.images.ImageRejected(reason, message)` for content that is not a usable image; the file then goes
    to `rejected/` (inbox) or is skipped with a warning (classes). `max_pixels` bounds decompression bombs.
    Stops at the first non-None result; the built-in Pillow decoder is `trylast`.
    """


@hookspec
def retraind_preprocessing_versions() -> list[str]:  # type: ignore[empty-body]
    """The preprocessing versions this plugin's `retraind_decode_image` makes (e.g. `["v1", "v2"]`).

    Called on the main thread at start-up; the lists are joined. A published model whose backbone id differs
    from the configured one only in its preprocessing version is served (HTTP and inbox filing, decoded with its
    own version) while the training images are cached again under the configured id, if one of these lists
    names its version; else nothing is served until a model is trained on the configured backbone.
    """


@hookspec(firstresult=True)
def retraind_accept_path(path: Path, area: str) -> bool | None:
    """Decide whether a file under a watched area (`"classes"` or `"inbox"`) is ours to process.

    Called on the pipeline worker thread for every file event and scan hit (the start-up scan is the
    worker's first turn) that no `watch.ignore` pattern left out. Return False to ignore the file
    (it is left where it is), True to take it, None to defer to the next plugin. Stops at the first non-None
    result; the built-in filter (`trylast`) ignores sidecar records and the daemon's own temporary files.
    """


@hookspec(firstresult=True)
def retraind_should_retrain(state: RetrainState) -> bool | None:
    """Decide whether the trainer thread starts a training run now.

    Called on the trainer thread about every quarter second while the training set has changed since the
    last run. Return True to train now, False to wait, None to defer. Stops at the first non-None result;
    the built-in policy (`trylast`) waits until no training file waits to be cached (`state.waiting`) and
    `training.quiet_period_seconds` have passed without a change (counted from the last cached bottleneck).
    """


@hookspec
def retraind_on_training_pending() -> None:
    """A first training run is coming: the training set changed, or the start-up check found the serving model
    out of date, and the trainer waits for the retrain policy (the quiet period).

    Called once per trainer (start-up, config reload), on the trainer thread, before its first run (while the
    quiet period runs, when there is one, and once no training image waits to be cached). Load here what a fit needs, so the first run does not pay for it: the built-in head and
    novelty plugins import SciPy (~0.5 s in a fresh process). A failure is logged and counted, never
    propagated; the run still happens."""


@hookspec(firstresult=True)
def retraind_train_head(dataset: Dataset, config: TrainingConfig) -> Head | None:
    """Train a classifier head on cached bottlenecks and return it, or None to defer to the next trainer.

    Called on the trainer thread for the served head, and for the out-of-fold heads of the trust fit on its
    worker threads (`daemon.trust.TrustFit`), up to one per core at once: keep no shared mutable state.
    `dataset` holds float32 train/validation/test matrices and integer labels
    indexing `dataset.labels`; fit on `dataset.training_rows` (the train split plus the cached distorted
    variants of its images) and keep validation and test for evaluation. Stops at the first non-None
    result; the built-in L-BFGS softmax trainer is `trylast`.
    """


@hookspec
def retraind_register_distortions(config: AugmentationConfig) -> list[Distortion]:  # type: ignore[empty-body]
    """Contribute random image distortions (`daemon.augment.Distortion`) for the cached training variants.

    Called once when the trainer is built (start-up and config reload), on the main thread, for every
    plugin; the returned lists are concatenated in call order and applied in that order, each distortion
    to the image the previous one returned. Return an empty list to contribute none. Variants are made
    only when `augmentation.variants_per_image` > 0 and some plugin returned a distortion. The built-in
    `distortions` plugin (`trylast`, so its geometry runs after any other plugin's) returns retrain.py's
    random_crop/random_scale, flip_left_right and random_brightness as configured.
    """


@hookspec(firstresult=True)
def retraind_fit_calibrator(logits: np.ndarray, labels: np.ndarray) -> Calibrator | None:
    """Fit a calibrator (`daemon.calibration.Calibrator`) on out-of-fold `logits` (n, classes) float32 with
    true label indices `labels` (n,) int64: predictions of heads that did not see those images.

    Called on the trainer thread once per training run, before the version is published; the calibrator's
    `save` then writes into the version folder and its `name` is recorded in `metrics.json`. Stops at the
    first non-None result; the built-in `temperature_scaling` plugin (`trylast`) fits one temperature.
    """


@hookspec(firstresult=True)
def retraind_load_calibrator(name: str, directory: Path) -> Calibrator | None:
    """Load the calibrator called `name` that a fitted calibrator saved into the version folder `directory`,
    or return None when this plugin does not make calibrators of that name.

    Called on the main thread at start-up and on one-shot commands, when a published version is loaded.
    Stops at the first non-None result; the built-in `temperature_scaling` plugin (`trylast`) loads
    `temperature`.
    """


@hookspec(firstresult=True)
def retraind_fit_novelty(x: np.ndarray, labels: np.ndarray) -> NoveltyScore | None:
    """Fit a novelty score (`daemon.novelty.NoveltyScore`: higher = less like the training images) on
    bottlenecks `x` (n, dim) float32 with label indices `labels` (n,) int64.

    Called once per training run on all train and validation images for serving, on a worker thread of the
    trust fit while the head is fitted (`daemon.trust.TrustFit`); and once per held-out group (each fold, each
    class left out) when no plugin answers `retraind_held_out_scorer`. Stops at the first non-None result; the
    built-in `mahalanobis_novelty` plugin (`trylast`) fits the class-conditional Mahalanobis distance.
    """


@hookspec(firstresult=True)
def retraind_held_out_scorer(novelty: NoveltyScore, x: np.ndarray,
                             labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray] | None:
    """Held-out novelty scores for `novelty`, the score `retraind_fit_novelty` just fitted on `x`, `labels`:
    a function that takes a group (int64 row indices into `x`) and returns the scores (len(group),) float32
    of its rows under a score of the same kind fitted on the other rows. Return None when this plugin does
    not make scores like `novelty`: the trainer then fits one score per group through `retraind_fit_novelty`.

    Called once per training run on a worker thread of the trust fit, right after the served score's fit
    (`daemon.trust.TrustFit`); the function is then called once per group (the folds: known images scored
    out-of-fold; the classes left out: leave-one-class-out) on the trust fit's worker threads, several at
    once, beside the head's fit and the fold heads, so it must be thread-safe. Stops at the first non-None
    result; the built-in `mahalanobis_novelty` plugin (`trylast`) answers for `class_mahalanobis` with the
    scatter matrix of the rows its fit used, less each group's share.
    """


@hookspec(firstresult=True)
def retraind_load_novelty(name: str, directory: Path) -> NoveltyScore | None:
    """Load the novelty score called `name` saved into the version folder `directory`, or return None when
    this plugin does not make scores of that name.

    Called on the main thread at start-up, when a published version is loaded. Stops at the first non-None
    result; the built-in `mahalanobis_novelty` plugin (`trylast`) loads `class_mahalanobis`.
    """


@hookspec
def retraind_write_model_artifacts(version: ModelVersion, directory: Path, dataset: Dataset,
                                   config: Config) -> None:
    """Add files (logs, exports) to a model version folder while it is being built: this delays the
    version's publication, so what can come later (pictures) belongs in `retraind_on_model_published`.

    Called on the trainer thread for every plugin, after the head, `labels.txt` and `metrics.json` are
    written and before the folder is atomically published; `directory` is the temporary folder, `config`
    the running configuration (e.g. `training.tensorboard`). A failure is logged and counted, and the
    version is still published.
    """


@hookspec
def retraind_on_model_published(version: ModelVersion) -> None:
    """Notification that `version` is now CURRENT and serving. Called on the trainer thread.

    This hook is the one path by which a published model is announced: the daemon itself listens on it
    (`tryfirst`) to update its metrics and classify the inbox files that waited for a first model. The
    built-in `plots` plugin draws its pictures here, into `version.directory`, each file written atomically:
    pictures never delay a model."""


@hookspec(firstresult=True)
def retraind_route_result(result: ClassificationResult, config: Config) -> Path | None:
    """Choose the folder an inbox image moves to once classified (it is moved atomically by the core).

    Called on the pipeline worker thread. Stops at the first non-None result; the built-in router
    (`trylast`) picks `review/` when `result.review_reason` is set (`low_confidence`: the calibrated top-1
    score is below the review threshold; `unfamiliar`: the novelty score is above the version's novelty
    threshold), else `outbox/<label>/`.
    """


@hookspec
def retraind_on_result(result: ClassificationResult, config: Config) -> None:
    """Sink a classification result after its image has reached its final place (`result.destination`).

    Called on the pipeline worker thread for every plugin; the built-in sinks write the sidecar record and
    append to `results.jsonl`. The fsyncs of `daemon.atomic`'s `write_atomic`, `move_atomic` and `sync_file`
    called here are deferred and done once for the whole inbox batch, after its last sink and before its
    journal entries close (`GroupCommit`). A sink may be called again for the same `result.id` after a crash,
    so it must be idempotent. A failing sink is logged and counted; the others still run. If one fails with an
    `OSError` (a full disk, a read-only folder), every sink is called again for that result later.
    """


@hookspec
def retraind_on_file_event(event: FileEvent) -> None:
    """Observe every file event the watcher or a rescan produced, before it is processed.

    Called on the pipeline worker thread (the start-up scan included). Must return quickly;
    failures are logged and counted.
    """


@hookspec
def retraind_on_rejected(path: Path, reason: str, message: str) -> None:
    """Notification that a file could not be used as an image: `reason` is a short metric label
    (`empty`, `corrupt`, `too_large`, `unsupported`, `unreadable`), `message` says why for a person.

    Called on the pipeline worker thread for inbox files, with `path` where the file now lies in
    `rejected/`. A training file that cannot be used is not moved: it is logged, counted in
    `retraind_rejected_files_total` and left out of training, without this notification.
    """
