"""The same job done the seed's way (retrain.py, then classify_image.py), re-implemented in TensorFlow 2 on the
same images and backbone, so the other benches' figures have a ratio against it.

- Bottlenecks, as `cache_bottlenecks` / `get_or_create_bottleneck` / `run_bottleneck_on_image` did: the graph
  is built once; per image, one call decodes the JPEG bytes and resizes them (decode_jpeg, float, bilinear
  resize, the backbone's scaling) and a second call runs the backbone on that one image; the vector is
  written as comma-separated text (`','.join(str(x) for x in values)`) to
  `<bottleneck_dir>/<label>/<image>_<backbone>.txt`, then read back and parsed.
- Training, as retrain.py's loop did (with `--how_many_training_steps 300`): plain SGD at learning rate 0.01
  on a softmax layer (truncated-normal start, stddev 0.001), each step on 100 bottlenecks picked at random
  (a label, then an image of it) and re-read from their text files; every 10 steps and at the last, the
  accuracy on that batch and on 100 random validation bottlenecks (re-read too); then the accuracy on every
  test bottleneck; then the graph is saved (a SavedModel, JPEG bytes to softmax) as it wrote
  output_graph.pb. The split is retrain.py's stable name hash (10% validation, 10% test).
- `run_inference_on_image`, as classify_image.py did: per call, read the image, load the saved graph again
  (its `create_graph()`), run it once.

Usage: python bench/seed_style.py [--n 403] [--steps 300] [--inference-calls 3] [--backbone efficientnet_lite0]"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np

from daemon.split import TEST, TRAIN, VALIDATION, split_of

BATCH, EVAL_INTERVAL, LEARNING_RATE = 100, 10, 0.01


def scaling(network: Any) -> tuple[float, float]:
    """The backbone's own input scaling (its Rescaling layer), which the seed's graph applied after resizing."""
    import keras

    layer = next(layer for layer in network.layers if isinstance(layer, keras.layers.Rescaling))
    return float(layer.scale), float(layer.offset)


class SeedGraph:
    """The seed's two graphs, built once: JPEG decoding and resizing, and the backbone on one image."""

    def __init__(self, keras_backbone: Any) -> None:
        import tensorflow as tf

        width, height = keras_backbone.input_size
        scale, offset = scaling(keras_backbone.network)
        model = keras_backbone.model

        @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
        def decode(contents: Any) -> Any:
            image = tf.cast(tf.io.decode_jpeg(contents, channels=3), tf.float32)
            return tf.image.resize(tf.expand_dims(image, 0), (height, width), method="bilinear") * scale + offset

        @tf.function(input_signature=[tf.TensorSpec([1, height, width, 3], tf.float32)])
        def bottleneck(resized: Any) -> Any:
            return model(resized, training=False)

        self.decode, self.bottleneck, self.model = decode, bottleneck, model

    def run_bottleneck_on_image(self, image_data: bytes) -> np.ndarray:
        resized = self.decode(image_data).numpy()
        return np.squeeze(self.bottleneck(resized).numpy())


def read_bottleneck(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split(",")]


def cache_bottlenecks(graph: SeedGraph, images: dict[str, list[Path]], store: Path) -> dict[str, list[Path]]:
    """Text files by label, in the order of `images`; created where missing, and always read back."""
    out: dict[str, list[Path]] = {}
    for label, paths in images.items():
        (store / label).mkdir(parents=True, exist_ok=True)
        out[label] = []
        for path in paths:
            text = store / label / f"{path.name}_backbone.txt"
            if not text.exists():
                values = graph.run_bottleneck_on_image(path.read_bytes())
                text.write_text(",".join(str(x) for x in values))
            read_bottleneck(text)
            out[label].append(text)
    return out


def random_batch(files: dict[str, dict[str, list[Path]]], split: str, size: int,
                 rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """retrain.py's get_random_cached_bottlenecks; size -1: every bottleneck of the split."""
    labels = sorted(files)
    if size < 0:
        pairs = [(i, path) for i, label in enumerate(labels) for path in files[label][split]]
    else:
        picks = [(i, rng.randrange(65536)) for i in (rng.randrange(len(labels)) for _ in range(size))]
        pairs = [(i, files[labels[i]][split][k % len(files[labels[i]][split])]) for i, k in picks
                 if files[labels[i]][split]]
    return (np.array([read_bottleneck(path) for _, path in pairs], dtype=np.float32),
            np.array([i for i, _ in pairs], dtype=np.int64))


def train(files: dict[str, dict[str, list[Path]]], dim: int, steps: int) -> tuple[Any, Any, float, float]:
    import tensorflow as tf

    classes = len(files)
    weights = tf.Variable(tf.random.truncated_normal([dim, classes], stddev=0.001, seed=1))
    bias = tf.Variable(tf.zeros([classes]))

    @tf.function
    def train_step(x: Any, y: Any) -> None:
        with tf.GradientTape() as tape:
            logits = tf.matmul(x, weights) + bias
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        grad_w, grad_b = tape.gradient(loss, [weights, bias])
        weights.assign_sub(LEARNING_RATE * grad_w)
        bias.assign_sub(LEARNING_RATE * grad_b)

    @tf.function
    def accuracy(x: Any, y: Any) -> Any:
        return tf.reduce_mean(tf.cast(tf.argmax(tf.matmul(x, weights) + bias, 1) == y, tf.float32))

    rng = random.Random(0)
    validation = 0.0
    for step in range(steps):
        x, y = random_batch(files, TRAIN, BATCH, rng)
        train_step(x, y)
        if step % EVAL_INTERVAL == 0 or step + 1 == steps:
            accuracy(x, y)
            validation = float(accuracy(*random_batch(files, VALIDATION, BATCH, rng)))
    test_x, test_y = random_batch(files, TEST, -1, rng)
    return weights, bias, validation, float(accuracy(test_x, test_y)) if len(test_y) else float("nan")


def save_graph(graph: SeedGraph, weights: Any, bias: Any, out: Path) -> None:
    import tensorflow as tf

    module = tf.Module()
    module.model, module.weights, module.bias = graph.model, weights, bias

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def classify(contents: Any) -> Any:
        features = module.model(graph.decode(contents), training=False)
        return tf.nn.softmax(tf.matmul(features, module.weights) + module.bias)

    module.classify = classify
    tf.saved_model.save(module, str(out))


def run_inference_on_image(image: Path, saved: Path) -> np.ndarray:
    import tensorflow as tf

    image_data = image.read_bytes()
    graph = tf.saved_model.load(str(saved))  # classify_image.py's create_graph(), on every call
    return np.asarray(graph.classify(tf.constant(image_data)))


def main() -> None:
    args = harness.arguments(__doc__, n=403, steps=300, inference_calls=3).parse_args()
    harness.header("seed_style", backbone=args.backbone, images=args.n, steps=args.steps, batch=BATCH)
    keras_backbone = harness.engines(args.backbone, args.cache, ("keras",))["keras"]
    device = harness.keras_device()
    images = harness.real_images(args.data, args.n)
    with harness.scratch("seed") as root:
        by_label: dict[str, list[Path]] = {}
        for label, name, payload in images:
            (root / "images" / label).mkdir(parents=True, exist_ok=True)
            (root / "images" / label / name).write_bytes(payload)
            by_label.setdefault(label, []).append(root / "images" / label / name)
        started = time.perf_counter()
        graph = SeedGraph(keras_backbone)
        texts = cache_bottlenecks(graph, by_label, root / "bottlenecks")
        seconds = time.perf_counter() - started
        harness.emit("seed.extract", len(images) / seconds, "img/s", device)
        files = {label: {split: [t for t, p in zip(texts[label], paths) if split_of(p.name, 10, 10) == split]
                         for split in (TRAIN, VALIDATION, TEST)} for label, paths in by_label.items()}
        started = time.perf_counter()
        weights, bias, validation, test = train(files, keras_backbone.dim, args.steps)
        trained = time.perf_counter()
        save_graph(graph, weights, bias, root / "output_graph")
        saved = time.perf_counter()
        harness.emit(f"seed.train_{args.steps}_steps", trained - started, "s", device)
        harness.emit("seed.save_graph", saved - trained, "s", device)
        harness.emit("seed.train_and_save", saved - started, "s", device)
        harness.note(f"seed-style head: validation accuracy {validation:.3f} (last batch), test accuracy {test:.3f}")
        calls = []
        for path in [p for paths in by_label.values() for p in paths][: args.inference_calls]:
            started = time.perf_counter()
            run_inference_on_image(path, root / "output_graph")
            calls.append(time.perf_counter() - started)
        harness.emit("seed.run_inference_on_image", float(np.median(calls)) * 1000, "ms", device)


if __name__ == "__main__":
    main()
