"""Shared fixtures: a real daemon on tmp_path with the tiny backbone, image makers, waiting with timeouts,
and a check that no test leaves a thread running."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from daemon.app import App
from daemon.config import Config, parse_config
from daemon.keras_engine import KerasBackbone
from daemon.tflite_engine import TfliteBackbone
from tests.tiny_backbone import TinyBackbonePlugin

#: the project's shared data: beside the checkout, or beside a folder of worktrees (as bench/harness.py finds it)
SHARED_DATA = next((p / "shared" / "data" / "tuxpaint6" for p in Path(__file__).resolve().parents[1:]
                    if (p / "shared" / "data" / "tuxpaint6").is_dir()),
                   Path(__file__).resolve().parents[2] / "shared" / "data" / "tuxpaint6")
COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40), "yellow": (230, 210, 40)}


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll `condition` until it is truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def image_bytes(colour: str, seed: int, fmt: str = "JPEG", size: tuple[int, int] = (48, 40)) -> bytes:
    """A noisy image of a named colour; `seed` makes each one different content."""
    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[colour], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-25, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: Path, colour: str, seed: int, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(colour, seed, fmt))
    return path


def make_config(root: Path, **sections: Any) -> Config:
    raw: dict[str, Any] = {
        "data_root": str(root / "data"),
        "backbone": {"name": "tiny", "batch_size": 16},
        "training": {"quiet_period_seconds": 0.3},
        "watch": {"settle_seconds": 0.2, "rescan_interval_seconds": 0},
        "http": {"port": 0},
        "split": {"validation_percentage": 20, "testing_percentage": 0},
        # a dozen images per label cannot prove a 90% precision, and these tests are about where files go:
        # they file above a fixed score unless a test asks for the derived thresholds (tests/test_trust*.py)
        "classify": {"confidence_threshold": 0.5, "novelty": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(raw, root)


@dataclass(frozen=True)
class Lite0Conversion:
    """The default backbone's Keras engine, and its TFLite conversion as cached in the `weights` folder."""

    keras: KerasBackbone
    tflite: TfliteBackbone
    weights: Path


@pytest.fixture(scope="session")
def lite0_conversion(tmp_path_factory: pytest.TempPathFactory) -> Lite0Conversion:
    """Made once per session through the real conversion path: it takes 20-50 s on 2 busy cores."""
    from daemon.tflite_engine import tflite_backbone
    from plugins import efficientnet_lite0

    keras_backbone = efficientnet_lite0.build("imagenet")
    weights = tmp_path_factory.mktemp("lite0-weights")
    converted = tflite_backbone(lambda: keras_backbone, keras_backbone.id, weights, threads=2)
    return Lite0Conversion(keras_backbone, converted, weights)


@pytest.fixture
def tiny() -> TinyBackbonePlugin:
    return TinyBackbonePlugin()


@pytest.fixture
def run_app(tmp_path: Path, tiny: TinyBackbonePlugin) -> Callable[..., Any]:
    """`with run_app(**config_sections) as app:` starts a real daemon on tmp_path."""

    @contextmanager
    def start(config: Config | None = None, extra: tuple[object, ...] = (), **sections: Any) -> Iterator[App]:
        with App(config or make_config(tmp_path, **sections), extra_plugins=(tiny, *extra)) as app:
            yield app

    return start


def seed_classes(root: Path, per_label: int = 12, labels: tuple[str, ...] = ("red", "blue")) -> None:
    for label in labels:
        for i in range(per_label):
            write_image(root / "data" / "classes" / label / f"{label}-{i}.jpg", label, seed=sum(map(ord, label)) * 100 + i)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """One daemon with a trained red/blue model (bodies up to 4 MB) for a module's read-only tests."""
    root = tmp_path_factory.mktemp("api")
    seed_classes(root)
    with App(make_config(root, http={"max_body_bytes": 4_000_000}), extra_plugins=(TinyBackbonePlugin(),)) as app:
        wait_for(lambda: app.serving.version, what="first model")
        yield app


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        leaked = [t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
        if not leaked:
            return
        time.sleep(0.05)
    raise AssertionError(f"threads left running: {[t.name for t in leaked]}")
