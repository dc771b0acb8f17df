"""TensorBoard logs of each training run (retrain.py's `--summaries_dir`), when `training.tensorboard` is on:
`models/<n>/tensorboard/{train,validation}` hold loss and accuracy at every recorded iteration of the fit,
`tensorboard/test` the final test loss and accuracy. Written with TensorFlow's own summary writer into the
version folder before it is published, so they appear and are pruned with their model.
`tensorboard --logdir state/models` compares the kept versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from daemon.config import Config
from daemon.dataset import Dataset
from daemon.hookspecs import hookimpl
from daemon.registry import ModelVersion
from daemon.split import TEST, TRAIN, VALIDATION


def _curves(history: dict[str, list[float]], split: str) -> dict[str, list[float]]:
    return {name: history.get(f"{split}_{name}", []) for name in ("loss", "accuracy")}


def _test_point(version: ModelVersion, dataset: Dataset) -> dict[str, list[float]]:
    test = dataset.parts[TEST]
    if not len(test.y):
        return {}
    p = version.head.probabilities(test.x)
    loss = float(-np.mean(np.log(np.maximum(p[np.arange(len(test.y)), test.y], 1e-12))))
    return {"loss": [loss], "accuracy": [float(np.mean(p.argmax(axis=1) == test.y))]}


def _write(folder: Path, curves: dict[str, list[float]], steps: list[int]) -> None:
    """`tf.summary.scalar` lives in the `tensorboard` package, which TensorFlow no longer requires; this is
    the same record (a float32 tensor tagged for the scalars dashboard) written by TensorFlow alone."""
    import tensorflow as tf
    from tensorflow.core.framework.summary_pb2 import SummaryMetadata

    metadata = SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    writer = tf.summary.create_file_writer(str(folder))
    with writer.as_default():
        for name, values in curves.items():
            for step, value in zip(steps, values):
                tf.summary.write(name, tf.constant(value, tf.float32), step=step, metadata=metadata)
    writer.close()


@hookimpl
def retraind_write_model_artifacts(version: ModelVersion, directory: Path, dataset: Dataset,
                                   config: Config) -> None:
    if not config.training.tensorboard:
        return
    history = version.head.history
    count = max((len(v) for k, v in history.items() if k != "step"), default=0)
    steps = [int(s) for s in history.get("step", range(count))]
    for split in (TRAIN, VALIDATION):
        _write(directory / "tensorboard" / split, _curves(history, split), steps)
    _write(directory / "tensorboard" / TEST, _test_point(version, dataset), steps[-1:] or [0])
