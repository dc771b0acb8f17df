"""Prometheus metrics, all on one injected registry (a fresh one per daemon, so tests never share state)."""

from __future__ import annotations

import typing
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from daemon import __version__
from daemon.images import REJECT_REASONS

#: `retraind_classifications_total{outcome}`: filed under outbox/<label>/, or sent to review/
OUTCOMES = ("classified", "review")
#: `retraind_classification_duration_seconds{stage}`
STAGES = ("decode", "route")
#: Where a failure can be logged and survived (the daemon goes on; the work is retried or mended later):
#: a pipeline step (a rescan mends it), a batch of files (tried one by one), one file (retried with a growing
#: delay), the destination folder or the move of a classified inbox file, making a batch's moves and records
#: durable, the move of an unusable one to rejected/, finishing an open journal entry, a retrain-policy plugin
#: (the quiet period decides instead), loading the training set ahead of a run in the quiet period (the run
#: loads it), the published model at start-up (a new one is trained), an HTTP request (answered with a JSON
#: 500), an inference batch of the HTTP batcher (its requests get the error), the TFLite engine at start-up
#: (`backbone.engine: auto` runs the Keras engine instead).
InternalErrorPlace = Literal["pipeline_step", "pipeline_batch", "pipeline_file", "inbox_folder", "inbox_move",
                             "inbox_durable", "inbox_reject", "journal_recovery", "retrain_policy",
                             "training_preload", "model_load", "http_request", "inference_batch", "engine_fallback"]
INTERNAL_ERROR_PLACES: tuple[str, ...] = typing.get_args(InternalErrorPlace)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the daemon exports; names follow Prometheus conventions (base units, `_total`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        Info("retraind_build", "Version of retraind", registry=r).info({"version": __version__})
        self.model_info = Gauge("retraind_model_info", "The model serving now", ["version", "backbone"], registry=r)
        self.model_version = Gauge("retraind_model_version", "Serving model version (0: none)", registry=r)
        self.images = Gauge("retraind_images", "Training images by label and split", ["label", "split"], registry=r)
        self.cache_hits = Counter(
            "retraind_bottleneck_cache_hits", "Bottlenecks found in the store", registry=r)
        self.cache_misses = Counter(
            "retraind_bottleneck_cache_misses", "Bottlenecks computed by the backbone", registry=r)
        self.compute_seconds = Histogram(
            "retraind_bottleneck_compute_seconds", "Backbone time per batch", buckets=_LATENCY_BUCKETS, registry=r)
        self.training_runs = Counter(
            "retraind_training_runs", "Training runs by result", ["result"], registry=r)
        self.training_seconds = Histogram(
            "retraind_training_duration_seconds", "Training run duration", buckets=_LATENCY_BUCKETS, registry=r)
        self.accuracy = Gauge(
            "retraind_model_accuracy_ratio", "Serving model accuracy by split", ["split"], registry=r)
        self.last_training = Gauge(
            "retraind_last_training_timestamp_seconds", "End of the last training run", registry=r)
        self.classifications = Counter(
            "retraind_classifications", "Inbox images classified", ["label", "outcome"], registry=r)
        self.classification_seconds = Histogram(
            "retraind_classification_duration_seconds", "Time per classification stage", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.confidence = Histogram(
            "retraind_prediction_confidence", "Top-1 score of classifications",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99), registry=r)
        self.label_conflicts = Gauge(
            "retraind_label_conflicts", "Contents (sha256) found under more than one label in classes/", registry=r)
        self.reviews = Counter("retraind_reviews", "Inbox images sent to review, by reason", ["reason"], registry=r)
        self.calibration_error = Gauge(
            "retraind_model_calibration_error_ratio", "Expected calibration error (10 bins) of the serving "
            "model's top-1 scores, raw and calibrated", ["split", "scores"], registry=r)
        self.target_precision = Gauge(
            "retraind_model_target_precision_ratio", "Precision the serving model's threshold was derived for",
            registry=r)
        self.expected_coverage = Gauge(
            "retraind_model_expected_coverage_ratio", "Share of known-class images expected to be filed",
            registry=r)
        self.review_threshold = Gauge(
            "retraind_model_review_threshold", "Derived thresholds of the serving model (calibrated top-1 "
            "score, novelty score)", ["score"], registry=r)
        self.filing_suspended = Gauge(
            "retraind_model_filing_suspended", "1 when no threshold reaches the target precision and every "
            "image goes to review (the log and `retraind status` say why)", registry=r)
        self.inbox_pending = Gauge("retraind_inbox_pending_files", "Inbox files waiting", registry=r)
        self.migration_info = Gauge(
            "retraind_migration_info", "1 while the training images are cached again under the configured "
            "backbone id (target) and the published model (source; served meanwhile: serving) waits for its "
            "successor", ["source", "target", "serving"], registry=r)
        self.migration_images = Gauge(
            "retraind_migration_images", "During a backbone migration: training images cached under the target "
            "id (cached), of all usable ones (total)", ["state"], registry=r)
        self.rejected = Counter("retraind_rejected_files", "Files that are not usable images", ["reason"], registry=r)
        self.overflows = Counter(
            "retraind_watch_overflows", "File-event queue overflows (each triggers a rescan)", registry=r)
        self.watch_errors = Counter(
            "retraind_watch_errors", "Folders inotify could not watch, by reason (each is polled instead)",
            ["reason"], registry=r)
        self.root_changes = Counter(
            "retraind_watch_root_changes", "Watched root folders deleted, moved away or replaced", ["folder"],
            registry=r)
        self.root_missing = Gauge(
            "retraind_watch_root_missing", "1 while a watched root folder is missing", ["folder"], registry=r)
        self.watch_mode = Gauge(
            "retraind_watch_mode", "1 for how each root folder is watched now: events or polling",
            ["folder", "mode"], registry=r)
        self.plugin_errors = Counter(
            "retraind_plugin_errors", "Exceptions raised by plugins", ["hook", "plugin"], registry=r)
        self.http_requests = Counter(
            "retraind_http_requests", "HTTP requests answered, by route name", ["route", "method", "code"],
            registry=r)
        self.http_seconds = Histogram(
            "retraind_http_request_duration_seconds", "HTTP request duration, by route name", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.http_inflight = Gauge("retraind_http_inflight_requests", "HTTP requests being answered", registry=r)
        self.batch_size = Histogram(
            "retraind_batch_size", "Images per inference batch of the HTTP batcher",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_queue = Gauge(
            "retraind_batch_queued_images", "Images waiting in the HTTP batcher's queue", registry=r)
        self.batch_rejections = Counter(
            "retraind_batch_rejections", "Inference requests refused because the batch queue was full",
            registry=r)
        self.internal_errors = Counter(
            "retraind_internal_errors", "Failures logged and survived, by where they happened", ["where"],
            registry=r)
        self.review_actions = Counter(
            "retraind_review_actions", "Reviewers' decisions (review page and /v1/review API) by action",
            ["action"], registry=r)
        for action in ("label", "reject", "move", "remove", "keep", "undo"):
            self.review_actions.labels(action=action)
        # Every series a rate() may look at exists from the start at 0 (prometheus_client's advice): a
        # counter first seen at its first increment hides that increment from rate() and increase().
        for place in INTERNAL_ERROR_PLACES:
            self.internal_errors.labels(where=place)
        self.published_version = Gauge(
            "retraind_published_model_version", "Newest version visible in a serving repository (0: none yet)",
            ["repository"], registry=r)
        self.publish_failures = Counter(
            "retraind_publish_failures", "Exports to serving repositories that failed (each is retried)",
            ["repository"], registry=r)
        self.publish_seconds = Histogram(
            "retraind_publish_duration_seconds", "Promotion to the version visible in a serving repository",
            ["repository"], buckets=_LATENCY_BUCKETS + (60.0, 120.0, 300.0), registry=r)
        for result in ("promoted", "rejected", "failed"):
            self.training_runs.labels(result=result)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        for stage in STAGES:
            self.classification_seconds.labels(stage=stage)
        for reason in ("watch_limit", "instance_limit", "other"):
            self.watch_errors.labels(reason=reason)
        for folder in ("classes", "inbox"):
            self.root_changes.labels(folder=folder)
            self.root_missing.labels(folder=folder).set(0)
        self.model_version.set(0)

    def known_labels(self, labels: tuple[str, ...]) -> None:
        """Export `retraind_classifications_total` at 0 for each label of a model about to serve."""
        for label in labels:
            for outcome in OUTCOMES:
                self.classifications.labels(label=label, outcome=outcome)

    def known_plugins(self, hooks_and_plugins: list[tuple[str, str]]) -> None:
        """Export `retraind_plugin_errors_total` at 0 for each (hook, plugin) called in isolation."""
        for hook, plugin in hooks_and_plugins:
            self.plugin_errors.labels(hook=hook, plugin=plugin)

    def internal_error(self, where: InternalErrorPlace) -> None:
        """Count a failure that was logged and survived (each place is exported from the start, at 0)."""
        self.internal_errors.labels(where=where).inc()
