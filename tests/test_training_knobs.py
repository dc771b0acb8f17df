"""The seed's training knobs: validated config keys, the optional mini-batch optimizers that use them, the
misclassified-test-images log and the TensorBoard summaries of a training run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.config import ConfigError, TrainingConfig, parse_config
from daemon.dataset import Dataset, Part
from plugins.softmax_head import _Objective, retraind_train_head
from tests.conftest import seed_classes, wait_for, write_image


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"training": {"optimizer": "rmsprop"}}, "training.optimizer: 'rmsprop' is not one of lbfgs, sgd, adam"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate: 0.0 is out of range"),
        ({"training": {"how_many_training_steps": 0}}, "training.how_many_training_steps: 0 is out of range"),
        ({"training": {"train_batch_size": 1.5}}, "training.train_batch_size: expected int"),
        ({"training": {"validation_batch_size": 0}}, "training.validation_batch_size: 0 evaluates no images"),
        ({"training": {"validation_batch_size": -2}}, "training.validation_batch_size: -2 is out of range"),
        ({"training": {"eval_step_interval": 0}}, "training.eval_step_interval: 0 is out of range"),
        ({"training": {"print_misclassified_test_images": "yes"}}, "training.print_misclassified_test_images"),
        ({"training": {"tensorboard": 1}}, "training.tensorboard: expected bool"),
        ({"augmentation": {"random_crop": -5}}, "augmentation.random_crop: -5.0 is out of range"),
        ({"augmentation": {"random_brightness": 100}}, "augmentation.random_brightness: 100.0 is out of range"),
        ({"augmentation": {"variants_per_image": 101}}, "augmentation.variants_per_image: 101 is out of range"),
        ({"augmentation": {"flip_left_right": 1}}, "augmentation.flip_left_right: expected bool"),
        ({"augmentation": {"random_flip": True}}, "augmentation.random_flip: unknown key"),
    ],
)
def test_knobs_are_validated(tmp_path: Path, raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, tmp_path)
    assert str(info.value).startswith(message)


def blobs(seed: int, per_class: int, classes: int = 3, dim: int = 8) -> Part:
    rng = np.random.default_rng(seed)
    centres = np.eye(classes, dim, dtype=np.float32) * 3
    y = np.repeat(np.arange(classes), per_class)
    return Part((centres[y] + rng.normal(0, 1, (len(y), dim))).astype(np.float32), y, ())


def dataset(variants: Part | None = None) -> Dataset:
    parts = {"train": blobs(0, 40), "validation": blobs(1, 20), "test": blobs(2, 20)}
    return Dataset(("a", "b", "c"), parts, "manifest", variants=variants)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_minibatch_optimizers_follow_the_seed_knobs(optimizer: str) -> None:
    config = TrainingConfig(optimizer=optimizer, l2=[1e-3], how_many_training_steps=301, learning_rate=0.05,
                            train_batch_size=16, validation_batch_size=7, eval_step_interval=50)
    head = retraind_train_head(dataset(), config)
    assert head.hyperparameters["trainer"] == f"minibatch_{optimizer}"
    assert head.hyperparameters["steps"] == 301 and head.hyperparameters["train_batch_size"] == 16
    assert head.history["step"] == [0, 50, 100, 150, 200, 250, 300]
    assert all(abs(a * 7 - round(a * 7)) < 1e-9 for a in head.history["validation_accuracy"])  # 7 images
    assert head.history["train_loss"][-1] < head.history["train_loss"][0]
    test = dataset().parts["test"]
    assert np.mean(head.probabilities(test.x).argmax(axis=1) == test.y) > 0.85


def test_lbfgs_default_ignores_the_sgd_knobs_and_fits_the_variant_rows() -> None:
    variants = blobs(3, 40)
    head = retraind_train_head(dataset(variants), TrainingConfig(how_many_training_steps=1, learning_rate=50.0))
    assert head.hyperparameters["trainer"] == "lbfgs_softmax"
    assert head.hyperparameters["train_rows"] == 240  # 120 train rows and 120 variant rows
    assert dataset(variants).counts() == {label: {"train": 40, "validation": 20, "test": 20} for label in "abc"}


def test_the_objective_over_row_blocks_is_the_weighted_cross_entropy_and_its_gradient() -> None:
    """The L-BFGS objective walks the rows in blocks (1,300 rows: three, the last partial): its loss is the
    class-weighted cross-entropy plus the L2 term computed over all rows at once, and its gradient matches
    central differences."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 1300)
    y[:100] = 0  # unequal classes: the balanced row weights differ
    part = Part((rng.normal(0, 1, (1300, 5)) + y[:, None]).astype(np.float32), y, ())
    objective = _Objective(part, 3, l2=0.01, balanced=True)
    theta = rng.normal(0, 0.3, 5 * 3 + 3)
    loss, grad = objective(theta)
    weights, bias = theta[:15].reshape(5, 3), theta[15:]
    logits = part.x.astype(np.float64) @ weights + bias
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    row_weights = 1.0 / (3 * np.bincount(y)[y])
    expected = -(row_weights * log_p[np.arange(1300), y]).sum() + 0.005 * (weights**2).sum()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert objective.last == pytest.approx((-log_p[np.arange(1300), y].mean(), np.mean(logits.argmax(1) == y)), rel=1e-5)
    step = np.eye(len(theta)) * 1e-3
    numeric = [(objective(theta + e)[0] - objective(theta - e)[0]) / 2e-3 for e in step]
    assert np.allclose(grad, numeric, atol=2e-4)


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    import tensorflow as tf
    from tensorflow.core.util.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = Event.FromString(record.numpy())
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name in ("", "scalars")
                scalars.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return scalars


def test_misclassified_test_images_are_logged_and_tensorboard_logs_written(
    tmp_path: Path, run_app: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    seed_classes(tmp_path)
    write_image(tmp_path / "data" / "classes" / "red" / "odd-0.jpg", "blue", seed=4242)  # a test image
    caplog.set_level(logging.INFO, logger="daemon.evaluation")
    with run_app(split={"testing_percentage": 30}, training={
            "tensorboard": True, "print_misclassified_test_images": True}) as app:
        version = wait_for(lambda: app.serving.version, what="first model")
    tested = sum(per_split["test"] for per_split in version.metrics["images"].values())
    assert f"=== MISCLASSIFIED TEST IMAGES: 1 of {tested} ===" in caplog.text
    assert "red/odd-0.jpg: is red, predicted blue" in caplog.text

    board = version.directory / "tensorboard"
    history = version.head.history
    for split in ("train", "validation"):
        scalars = tensorboard_scalars(board / split)
        assert [v for _, v in scalars["accuracy"]] == pytest.approx(history[f"{split}_accuracy"])
        assert [v for _, v in scalars["loss"]] == pytest.approx(history[f"{split}_loss"])
        assert [s for s, _ in scalars["loss"]] == list(range(len(history[f"{split}_loss"])))
    test = tensorboard_scalars(board / "test")
    assert test["accuracy"] == [(len(history["train_loss"]) - 1, pytest.approx((tested - 1) / tested))]
    assert version.metrics["accuracy"]["test"] == pytest.approx((tested - 1) / tested)


def test_no_tensorboard_logs_unless_asked(tmp_path: Path, run_app: Any) -> None:
    seed_classes(tmp_path)
    with run_app() as app:
        version = wait_for(lambda: app.serving.version, what="first model")
    assert not (version.directory / "tensorboard").exists()
