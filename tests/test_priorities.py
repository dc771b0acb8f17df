"""Performance as behaviour (no timings asserted beyond generous bounds): the inbox goes before a backlog of
training images, no head is trained while images still wait to be cached, a renamed-in file is taken without
the settle wait, and a start-up is ready before its reconcile scan has run."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from daemon.app import App
from daemon.backbone import Backbone
from daemon.config import BackboneConfig
from daemon.events import EventKind, FileEvent
from daemon.extractor import Extractor
from daemon.hookspecs import hookimpl
from daemon.metrics import Metrics
from daemon.retrain_policy import RetrainState
from daemon.store import Store
from tests.conftest import make_config, seed_classes, wait_for, write_image
from tests.tiny_backbone import TinyBackbonePlugin

SECONDS_PER_IMAGE = 0.015  # the slowed engine: 300 training images keep it busy for ~4.5 s


class SlowBackbone(TinyBackbonePlugin):
    """The tiny backbone, made as slow per image as a real one, so that a backfill takes a while."""

    @hookimpl
    def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> Backbone | None:
        inner = super().retraind_make_backbone(config, cache_dir)
        if inner is None:
            return None

        class Slow:
            id, input_size, dim = inner.id, inner.input_size, inner.dim

            def embed(self, images: np.ndarray) -> np.ndarray:
                time.sleep(SECONDS_PER_IMAGE * len(images))
                return inner.embed(images)

        return Slow()


def cached(app: App) -> float:
    return app.metrics.registry.get_sample_value("retraind_bottleneck_cache_misses_total") or 0.0


def result_of(data: Path, name: str) -> bool:
    return any(data.glob(f"outbox/*/{name}.json")) or (data / "review" / f"{name}.json").is_file()


def test_inbox_is_served_during_a_backfill_and_no_head_is_trained_before_it_ends(tmp_path: Path) -> None:
    seed_classes(tmp_path)
    data = tmp_path / "data"
    with App(make_config(tmp_path), extra_plugins=(SlowBackbone(),)) as app:
        wait_for(lambda: app.trainer.runs and app.pipeline.idle.is_set(), what="first model")
        runs, before = app.trainer.runs, cached(app)
        backlog = 300
        for i in range(backlog):
            label = ("red", "blue")[i % 2]
            write_image(data / "classes" / label / f"more-{i}.jpg", label, seed=5000 + i)
        wait_for(lambda: cached(app) >= before + 40, what="the backfill under way")
        write_image(tmp_path / "outside" / "query.jpg", "blue", seed=9999)
        os.rename(tmp_path / "outside" / "query.jpg", data / "inbox" / "query.jpg")
        wait_for(lambda: result_of(data, "query.jpg"), what="the inbox file's result")
        assert cached(app) < before + backlog, "the inbox file waited for the whole backlog"

        wait_for(lambda: cached(app) >= before + backlog + 1, what="the backfill's end")
        assert app.trainer.runs == runs, "a head was trained while training images were still being cached"
        wait_for(lambda: app.trainer.runs > runs, what="the retrain after the backfill")


class PolicyWatch:
    """Notes, at each retrain-policy call made while training images wait to be cached, whether the trainer had
    already loaded what a fit needs (`retraind_on_training_pending`); defers every decision to the built-in."""

    def __init__(self) -> None:
        self.prepared = False
        self.while_waiting: list[bool] = []

    @hookimpl
    def retraind_on_training_pending(self) -> None:
        self.prepared = True

    @hookimpl
    def retraind_should_retrain(self, state: RetrainState) -> None:
        if state.waiting:
            self.while_waiting.append(self.prepared)


def test_the_trainer_prepares_once_the_backlog_is_cached(tmp_path: Path) -> None:
    """200 training images (two caching chunks, ~3 s on the slowed engine): the trainer is told of the first
    chunk's images while the second is cached, and waits, but loads SciPy (`retraind_on_training_pending`: ~0.5
    s of CPU, most of it holding the GIL) only once nothing waits to be cached, before its first run."""
    seed_classes(tmp_path, per_label=100)
    watch = PolicyWatch()
    with App(make_config(tmp_path), extra_plugins=(SlowBackbone(), watch)) as app:
        wait_for(lambda: app.trainer.runs, what="the first model")
    assert watch.while_waiting, "the trainer was never asked while images waited to be cached"
    assert not any(watch.while_waiting), "the trainer prepared while training images were still being cached"
    assert watch.prepared


def test_a_renamed_in_file_is_taken_without_the_settle_wait(tmp_path: Path) -> None:
    seed_classes(tmp_path)
    data = tmp_path / "data"
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin(),)) as app:
        wait_for(lambda: app.serving.version and app.pipeline.idle.is_set(), what="first model")
    outside = tmp_path / "outside"
    config = make_config(tmp_path, watch={"settle_seconds": 60})
    with App(config, extra_plugins=(TinyBackbonePlugin(),)) as app:
        wait_for(app.pipeline.idle.is_set, what="an idle pipeline")
        writing = open(data / "inbox" / "open.jpg", "wb")  # noqa: SIM115 - written in place, not closed yet
        writing.write(write_image(outside / "open.jpg", "red", seed=7001).read_bytes())
        writing.flush()
        write_image(outside / "query.jpg", "red", seed=7000)
        write_image(outside / "train.jpg", "blue", seed=7002)
        os.rename(outside / "query.jpg", data / "inbox" / "query.jpg")
        os.rename(outside / "train.jpg", data / "classes" / "blue" / "train.jpg")
        wait_for(lambda: result_of(data, "query.jpg"), timeout=10, what="the renamed inbox file's result")
        wait_for(lambda: "blue/train.jpg" in app.store.catalog(), timeout=10, what="the renamed training file")
        assert not result_of(data, "open.jpg"), "a file still open for writing was taken"
        writing.close()
        wait_for(lambda: result_of(data, "open.jpg"), timeout=10, what="the in-place file after its close")


class BlockingScan:
    """Holds the reconcile scan on its first file until released (or 20 s)."""

    def __init__(self) -> None:
        self.scanning, self.release = threading.Event(), threading.Event()

    @hookimpl
    def retraind_on_file_event(self, event: FileEvent) -> None:
        if event.kind is EventKind.SCANNED:
            self.scanning.set()
            self.release.wait(20)


def test_ready_and_serving_before_the_scan(tmp_path: Path) -> None:
    seed_classes(tmp_path)
    data = tmp_path / "data"
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin(),)) as app:
        wait_for(lambda: app.serving.version, what="first model")
        version = app.serving.version.number
    write_image(data / "classes" / "red" / "new-while-down.jpg", "red", seed=8000)  # the scan has work
    blocking = BlockingScan()
    started = time.monotonic()
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin(), blocking)) as app:
        entered = time.monotonic() - started
        assert blocking.scanning.wait(10), "the scan never started"
        assert app.http is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{app.http.port}/readyz", timeout=10) as reply:
            ready: Any = reply.status
        assert ready == 200 and app.serving.version and app.serving.version.number == version
        assert not blocking.release.is_set() and entered < 10, "start-up waited for the scan"
        blocking.release.set()
        wait_for(lambda: "red/new-while-down.jpg" in app.store.catalog(), what="the scan's file cached")


def test_one_batch_two_files_of_one_name(tmp_path: Path) -> None:
    """An inbox batch is journalled, then moved: files of one name in one batch still get two destinations."""
    seed_classes(tmp_path)
    data = tmp_path / "data"
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin(),)) as app:
        wait_for(lambda: app.serving.version and app.pipeline.idle.is_set(), what="first model")
        outside = tmp_path / "outside"
        for i, folder in enumerate(("a", "b", "c")):
            write_image(outside / folder / "same.jpg", "red", seed=6000 + i)
        os.rename(outside, data / "inbox" / "batch")  # one folder renamed in: its files arrive together
        wait_for(lambda: len(list(data.glob("outbox/*/same*.jpg.json"))) == 3, what="three results")
    assert len({p.name for p in data.glob("outbox/*/same*.jpg")}) == 3


class SlowTrainingEvents:
    """Each event of a training file (the watcher's, or the scan's when `scanned`) costs `seconds` on the
    pipeline thread, as on a slow NAS; counts them in `seen`."""

    def __init__(self, classes: Path, seconds: float, scanned: bool) -> None:
        self.classes, self.seconds, self.scanned, self.seen = classes, seconds, scanned, 0

    @hookimpl
    def retraind_on_file_event(self, event: FileEvent) -> None:
        if event.path.is_relative_to(self.classes) and (event.kind is EventKind.SCANNED) == self.scanned:
            time.sleep(self.seconds)
            self.seen += 1


def test_a_long_scan_does_not_hold_up_the_inbox(tmp_path: Path) -> None:
    """The reconcile scan of a large tree (here 250 new files at 20 ms each: 5 s) runs a slice per turn: an
    inbox file dropped during it gets its result before the scan is through."""
    seed_classes(tmp_path)
    data = tmp_path / "data"
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin(),)) as app:
        wait_for(lambda: app.serving.version and app.pipeline.idle.is_set(), what="first model")
    tree = 250
    content = (data / "classes" / "red" / "red-0.jpg").read_bytes()
    for i in range(tree):
        (data / "classes" / "red" / f"copied-while-down-{i}.jpg").write_bytes(content)
    slow = SlowTrainingEvents(data / "classes", 0.02, scanned=True)
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin(), slow)) as app:
        wait_for(lambda: slow.seen >= 5, what="the scan under way")
        write_image(tmp_path / "outside" / "query.jpg", "red", seed=9100)
        os.rename(tmp_path / "outside" / "query.jpg", data / "inbox" / "query.jpg")
        wait_for(lambda: result_of(data, "query.jpg"), what="the inbox file's result")
        assert slow.seen < tree, "the inbox file waited for the whole scan"
        wait_for(lambda: f"red/copied-while-down-{tree - 1}.jpg" in app.store.catalog(), what="the scan's end")


def test_the_inbox_goes_before_a_flood_of_training_events(tmp_path: Path) -> None:
    """1,500 training files renamed in at once (2 ms of work each on the pipeline thread: 3 s), then one inbox
    file: its event is taken before the flood's, which is handled a slice per turn."""
    seed_classes(tmp_path)
    data = tmp_path / "data"
    slow = SlowTrainingEvents(data / "classes", 0.002, scanned=False)
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin(), slow)) as app:
        wait_for(lambda: app.serving.version and app.pipeline.idle.is_set(), what="first model")
        flood, outside = 1500, tmp_path / "outside"
        content = (data / "classes" / "blue" / "blue-0.jpg").read_bytes()
        for i in range(flood):
            (outside / "flood").mkdir(parents=True, exist_ok=True)
            (outside / "flood" / f"flood-{i}.jpg").write_bytes(content)
        write_image(outside / "query.jpg", "blue", seed=9200)
        before = slow.seen
        for i in range(flood):
            os.rename(outside / "flood" / f"flood-{i}.jpg", data / "classes" / "blue" / f"flood-{i}.jpg")
        os.rename(outside / "query.jpg", data / "inbox" / "query.jpg")
        wait_for(lambda: result_of(data, "query.jpg"), what="the inbox file's result")
        assert slow.seen - before < flood, "the inbox file waited for every training event"
        wait_for(lambda: f"blue/flood-{flood - 1}.jpg" in app.store.catalog(), what="the flood cached")


class OneImagePerPass:
    """An engine that runs one image per pass (as the TFLite engine does), 10 ms each, noting which images ran:
    the first pixel tells a background image (0) from an urgent one (1)."""

    id, input_size, dim = "one-per-pass/v1", (8, 8), 4
    one_image_per_pass = True

    def __init__(self) -> None:
        self.ran: list[int] = []

    def embed(self, images: np.ndarray) -> np.ndarray:
        for image in images:
            time.sleep(0.01)
            self.ran.append(int(image[0, 0, 0]))
        return np.zeros((len(images), self.dim), dtype=np.float32)


def test_an_urgent_image_waits_for_a_piece_of_a_background_batch_not_all_of_it(tmp_path: Path) -> None:
    """On an engine without batch gains, a background batch of 32 takes the engine 4 images at a time: an inbox
    image asked for while it runs goes after at most one piece."""
    engine = OneImagePerPass()
    store = Store(tmp_path / "store.sqlite")
    extractor = Extractor(engine, lambda data, size, max_pixels, preprocessing: None, store, Metrics(), 10**8, batch_size=32)
    background = threading.Thread(target=extractor.embed, args=(np.zeros((32, 8, 8, 3), dtype=np.uint8),))
    background.start()
    wait_for(lambda: len(engine.ran) >= 2, what="the background batch under way")
    asked_at = len(engine.ran)
    extractor.embed(np.ones((1, 8, 8, 3), dtype=np.uint8), urgent=True)
    background.join()
    store.close()
    assert engine.ran.count(0) == 32
    assert engine.ran.index(1) - asked_at <= 4, f"the urgent image waited for {engine.ran.index(1) - asked_at} images"


class HeldEngine(TinyBackbonePlugin):
    """The tiny backbone, whose forward pass waits for `release` while `hold` is set (`held` tells one is
    waiting), and a decoder that notes the content it was given (sha256) and leaves decoding to Pillow."""

    def __init__(self) -> None:
        super().__init__()
        self.hold, self.held, self.release = threading.Event(), threading.Event(), threading.Event()
        self.decoded: set[str] = set()

    @hookimpl(tryfirst=True)
    def retraind_decode_image(self, data: bytes, size: tuple[int, int], max_pixels: int) -> None:
        self.decoded.add(hashlib.sha256(data).hexdigest())

    def before_pass(self) -> None:
        """Run on the engine's thread before each forward pass."""
        if self.hold.is_set():
            self.held.set()
            self.release.wait(60)

    @hookimpl
    def retraind_make_backbone(self, config: BackboneConfig, cache_dir: Path) -> Backbone | None:
        inner = super().retraind_make_backbone(config, cache_dir)
        if inner is None:
            return None
        before_pass = self.before_pass

        class Held:
            id, input_size, dim = inner.id, inner.input_size, inner.dim

            def embed(self, images: np.ndarray) -> np.ndarray:
                before_pass()
                return inner.embed(images)

        return Held()


def test_the_next_inbox_batch_is_decoded_while_one_is_embedded(tmp_path: Path) -> None:
    """A burst of 8 inbox files in batches of 4: while the first batch is in the engine, the second one's files
    are read and decoded already, so the engine never waits for a batch's decoding."""
    seed_classes(tmp_path)
    data, outside = tmp_path / "data", tmp_path / "outside"
    engine = HeldEngine()
    with App(make_config(tmp_path, backbone={"batch_size": 4}), extra_plugins=(engine,)) as app:
        wait_for(lambda: app.serving.version and app.pipeline.idle.is_set(), what="first model")
        burst = [write_image(outside / "burst" / f"query-{i}.jpg", "red", seed=9300 + i) for i in range(8)]
        contents = {hashlib.sha256(path.read_bytes()).hexdigest() for path in burst}
        engine.hold.set()
        try:
            os.rename(outside / "burst", data / "inbox" / "burst")  # one folder renamed in: one burst of 8
            wait_for(engine.held.is_set, what="the first batch in the engine")
            wait_for(lambda: contents <= engine.decoded, timeout=10,
                     what="every file of the burst decoded while its first batch is in the engine")
        finally:
            engine.release.set()
        wait_for(lambda: len(list(data.glob("outbox/*/query-*.jpg.json"))) == 8, what="eight results")


class GatedEngine(HeldEngine):
    """The tiny backbone whose forward passes, while `gated`, each wait for a permit (`admit`); `waiting` is
    how many wait now. Its decoder notes the content it was given, as `HeldEngine`'s does."""

    def __init__(self) -> None:
        super().__init__()
        self.gated = False
        self.waiting = 0
        self._permits = threading.Semaphore(0)
        self._lock = threading.Lock()

    def admit(self, passes: int = 1) -> None:
        self._permits.release(passes)

    def before_pass(self) -> None:
        if self.gated:
            with self._lock:
                self.waiting += 1
            self._permits.acquire(timeout=60)
            with self._lock:
                self.waiting -= 1


def test_inbox_files_that_arrive_during_a_burst_join_it(tmp_path: Path) -> None:
    """A burst of 8 inbox files in batches of 4, and 4 more renamed in while its first batch is in the engine:
    once that batch is filed, the 4 join the burst and are decoded while its second batch is still in the
    engine, not after the burst's last batch (a turn boundary left the engine idle for 0.15-0.3 s)."""
    seed_classes(tmp_path)
    data, outside = tmp_path / "data", tmp_path / "outside"
    engine = GatedEngine()
    with App(make_config(tmp_path, backbone={"batch_size": 4}), extra_plugins=(engine,)) as app:
        wait_for(lambda: app.serving.version and app.pipeline.idle.is_set(), what="first model")
        for i in range(8):
            write_image(outside / "burst" / f"query-{i}.jpg", "red", seed=9400 + i)
        later = [write_image(outside / "later" / f"late-{i}.jpg", "blue", seed=9500 + i) for i in range(4)]
        late = {hashlib.sha256(path.read_bytes()).hexdigest() for path in later}
        arrived = data / "inbox" / "later"

        def later_queued() -> bool:
            return any(isinstance(e, FileEvent) and (e.dest or e.path).is_relative_to(arrived)
                       for e in list(app.events.queue))

        engine.gated = True
        try:
            os.rename(outside / "burst", data / "inbox" / "burst")
            wait_for(lambda: engine.waiting == 1, what="the burst's first batch in the engine")
            os.rename(outside / "later", arrived)
            wait_for(later_queued, what="the event of the files renamed in later")
            engine.admit()
            wait_for(lambda: late <= engine.decoded, timeout=10,
                     what="the later files decoded while the burst's second batch is in the engine")
            assert engine.waiting == 1 and not list(data.glob("outbox/*/query-*.json"))[4:]
        finally:
            engine.gated = False
            engine.admit(100)
        wait_for(lambda: len(list(data.glob("outbox/*/*.jpg.json"))) == 12, what="twelve results")


def test_an_inbox_files_bottleneck_is_kept_with_its_journal_entry(tmp_path: Path) -> None:
    """The inbox's new bottlenecks are stored in the commit of the batch's journal entries, not on the engine's
    thread: the same content dropped again is found in the store, not embedded again."""
    seed_classes(tmp_path)
    data, outside = tmp_path / "data", tmp_path / "outside"
    with App(make_config(tmp_path), extra_plugins=(TinyBackbonePlugin(),)) as app:
        wait_for(lambda: app.serving.version and app.pipeline.idle.is_set(), what="first model")
        hits = lambda: app.metrics.registry.get_sample_value("retraind_bottleneck_cache_hits_total") or 0.0
        first = write_image(outside / "first.jpg", "red", seed=9600)
        misses_before, hits_before = cached(app), hits()
        os.rename(first, data / "inbox" / "first.jpg")
        wait_for(lambda: result_of(data, "first.jpg"), what="the first file's result")
        assert cached(app) == misses_before + 1
        content = next(data.glob("*/**/first.jpg")).read_bytes()
        assert app.store.get_bottlenecks(app.backbone.id, [hashlib.sha256(content).hexdigest()])
        again = outside / "again.jpg"
        again.write_bytes(content)
        os.rename(again, data / "inbox" / "again.jpg")
        wait_for(lambda: result_of(data, "again.jpg"), what="the second file's result")
        assert (cached(app), hits()) == (misses_before + 1, hits_before + 1)
