"""Head trainer quality and speed: retraind's L-BFGS softmax head against a tuned scikit-learn
LogisticRegression on the same real bottlenecks (EfficientNet-Lite0 on ../shared/data/tuxpaint6).

Prints one line per measurement. Usage: python bench/head_quality.py [--splits 10] [--data DIR]"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from daemon.config import TrainingConfig, parse_config
from daemon.dataset import Dataset, Part
from daemon.engines import build_backbone
from daemon.extractor import Extractor
from daemon.head import accuracy
from daemon.images import read_image_file
from daemon.metrics import Metrics
from daemon.plugin_manager import Hooks, make_plugin_manager
from daemon.store import Store
from plugins.softmax_head import retraind_train_head

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tuxpaint6"


def bottlenecks(data: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    config = parse_config({"data_root": tempfile.mkdtemp()}, Path.cwd())
    hooks = Hooks(make_plugin_manager())
    backbone = build_backbone(hooks, config)
    store = Store(Path(tempfile.mkdtemp()) / "s.sqlite")
    extractor = Extractor(backbone, hooks.decode_image, store, Metrics(), config.watch.max_image_pixels, 32)
    labels = tuple(sorted(p.name for p in data.iterdir() if p.is_dir()))
    files, y = [], []
    for index, label in enumerate(labels):
        for path in sorted((data / label).iterdir()):
            files.append(read_image_file(path, 1 << 26))
            y.append(index)
    vectors = extractor.extract(files).vectors
    extractor.close()
    return np.stack([vectors[f.sha256] for f in files]), np.array(y), labels


def stratified_split(y: np.ndarray, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: max(1, int(fraction * np.sum(y == c)))]
                           for c in np.unique(y)])
    mask = np.zeros(len(y), bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    x, y, labels = bottlenecks(args.data)
    ours, theirs, t_ours, t_theirs = [], [], [], []
    for seed in range(args.splits):
        rest, test = stratified_split(y, seed, 0.2)
        train_idx, val_idx = stratified_split(y[rest], seed + 100, 0.125)
        train, val = rest[train_idx], rest[val_idx]
        part = lambda idx: Part(x[idx], y[idx], ())
        dataset = Dataset(labels, {"train": part(train), "validation": part(val), "test": part(test)}, "")
        started = time.perf_counter()
        head = retraind_train_head(dataset, TrainingConfig())
        t_ours.append(time.perf_counter() - started)
        ours.append(accuracy(head, x[test], y[test]))
        started = time.perf_counter()
        grid = GridSearchCV(LogisticRegression(max_iter=3000, class_weight="balanced"),
                            {"C": [0.01, 0.1, 1, 10, 100]}, cv=5, n_jobs=1).fit(x[rest], y[rest])
        t_theirs.append(time.perf_counter() - started)
        theirs.append(float(np.mean(grid.predict(x[test]) == y[test])))
    print(f"images {len(y)} classes {len(labels)} splits {args.splits} (80/20 stratified, ours: 70/10 train/val)")
    print(f"retraind_lbfgs_head accuracy {np.mean(ours):.4f} +- {np.std(ours):.4f} fit_seconds {np.mean(t_ours):.3f}")
    print(f"sklearn_logreg_cv5 accuracy {np.mean(theirs):.4f} +- {np.std(theirs):.4f} fit_seconds "
          f"{np.mean(t_theirs):.3f}")
    print(f"ratio accuracy {np.mean(ours) / np.mean(theirs):.4f} speed {np.mean(t_theirs) / np.mean(t_ours):.1f}x")
    big = np.concatenate([x + np.random.default_rng(i).normal(0, 0.05, x.shape).astype(np.float32)
                          for i in range(8)])
    big_y = np.tile(y, 8)
    dataset = Dataset(labels, {"train": Part(big, big_y, ()), "validation": Part(x[:40], y[:40], ()),
                               "test": Part(x[:1], y[:1], ())}, "")
    started = time.perf_counter()
    retraind_train_head(dataset, TrainingConfig())
    print(f"retraind_lbfgs_head rows {len(big_y)} fit_seconds {time.perf_counter() - started:.3f}")


if __name__ == "__main__":
    main()
