"""Dynamic batching: requests that arrive while the engine is busy go into one batch, a request larger than a
batch is split, a full queue is refused at once (503 with Retry-After over HTTP), stopping fails what is
queued, and the inbox and HTTP share the engine without starving each other."""

from __future__ import annotations

import base64
import json
import threading
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from daemon.batcher import ANSWER_GROUP_IMAGES, Batcher, BatcherStopped, EmbedParts, QueueFull
from daemon.config import BatchingConfig
from daemon.metrics import Metrics
from tests.conftest import image_bytes, seed_classes, wait_for, write_image
from tests.test_http_api import MODEL, call
from tests.tiny_backbone import TinyBackbonePlugin


class GatedEngine:
    """An engine whose forward passes wait for `gate`; it records each batch's size. Row i's bottleneck is
    the mean of image i, so a caller can check it got its own rows back."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.gate.wait(10)
        self.sizes.append(len(images))
        return images.reshape(len(images), -1).mean(axis=1, keepdims=True).astype(np.float32)


def in_one_turn(engine: Callable[[np.ndarray], np.ndarray]) -> EmbedParts:
    """What Extractor.embed_parts does, on `engine` and without the engine's turns."""
    def run(parts: Sequence[np.ndarray], done: Callable[[int, np.ndarray], None]) -> None:
        for index, part in enumerate(parts):
            done(index, engine(part))
    return run


def images(*values: int) -> np.ndarray:
    return np.stack([np.full((4, 4, 3), v, dtype=np.uint8) for v in values])


@pytest.fixture
def gated() -> Any:
    engine = GatedEngine()
    batcher = Batcher(in_one_turn(engine),
                      BatchingConfig(max_batch_size=8, batch_timeout_micros=0, max_enqueued_batches=2), Metrics())
    batcher.start()
    yield engine, batcher
    engine.gate.set()
    batcher.stop()


def test_requests_gather_while_the_engine_is_busy(gated: Any) -> None:
    engine, batcher = gated
    (first,) = batcher.submit(images(1))
    wait_for(lambda: batcher._queued == 0, what="the first batch to start")
    later = [batcher.submit(images(v))[0] for v in range(2, 8)]
    engine.gate.set()
    assert first.result(5).tolist() == [[1.0]]
    assert [f.result(5).tolist() for f in later] == [[[float(v)]] for v in range(2, 8)]
    assert engine.sizes == [1, 6]


def test_big_requests_are_split_and_a_full_queue_is_refused(gated: Any) -> None:
    engine, batcher = gated
    batcher.submit(images(1))
    wait_for(lambda: batcher._queued == 0, what="the engine to be busy")
    parts = batcher.submit(images(*range(10, 22)))  # 12 images: a batch of 8 and one of 4
    assert len(parts) == 2
    batcher.submit(images(30, 31, 32))
    with pytest.raises(QueueFull, match="15 images waiting") as refused:
        batcher.submit(images(40, 41))  # 15 + 2 > 2 batches of 8
    assert refused.value.retry_after >= 1
    engine.gate.set()
    assert np.concatenate([p.result(5) for p in parts]).ravel().tolist() == list(map(float, range(10, 22)))
    assert engine.sizes == [1, 8, 7]  # the 4 left over and the 3 after them run together


class SteppedEngine:
    """Each forward pass waits for one `step()`; an image of value 99 fails its pass."""

    def __init__(self) -> None:
        self.steps = threading.Semaphore(0)
        self.sizes: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        assert self.steps.acquire(timeout=10)
        self.sizes.append(len(images))
        if (images == 99).any():
            raise RuntimeError("the engine failed")
        return images.reshape(len(images), -1).mean(axis=1, keepdims=True).astype(np.float32)


@pytest.fixture
def stepped() -> Iterator[tuple[SteppedEngine, Batcher, Metrics]]:
    engine, metrics = SteppedEngine(), Metrics()
    batcher = Batcher(in_one_turn(engine), BatchingConfig(max_batch_size=32, batch_timeout_micros=0), metrics,
                      gains_from_batches=False)
    batcher.start()
    yield engine, batcher, metrics
    engine.steps.release(100)
    batcher.stop()


def test_requests_are_answered_group_by_group_within_a_batch(stepped: Any) -> None:
    """Kind: for an engine that runs one image per pass, a batch made its first request wait for its last
    (with 64 clients, a 32-image batch is ~190 ms). Requests are answered in groups of ANSWER_GROUP_IMAGES;
    the batch still takes one engine turn and counts as one batch."""
    assert ANSWER_GROUP_IMAGES == 8
    engine, batcher, metrics = stepped
    (first,) = batcher.submit(images(1))
    wait_for(lambda: batcher._queued == 0, what="the first batch to start")
    five, three, two = (batcher.submit(images(*values))[0] for values in ((2, 3, 4, 5, 6), (7, 8, 9), (10, 11)))
    engine.steps.release()
    assert first.result(5).tolist() == [[1.0]]
    engine.steps.release()
    assert five.result(5).ravel().tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert three.result(5).ravel().tolist() == [7.0, 8.0, 9.0]
    assert not two.done()  # its group has not run: the first group was answered without waiting for it
    engine.steps.release()
    assert two.result(5).ravel().tolist() == [10.0, 11.0]
    assert engine.sizes == [1, 8, 2]
    assert metrics.registry.get_sample_value("retraind_batch_size_count") == 2
    assert metrics.registry.get_sample_value("retraind_batch_size_sum") == 11


def test_a_request_given_up_is_not_run_and_stops_nothing(stepped: Any) -> None:
    """Kind: a caller that gives up (its task cancelled, e.g. at shutdown) cancels its future; handing a cancelled
    future its result raised InvalidStateError in the batcher thread."""
    engine, batcher, _ = stepped
    (first,) = batcher.submit(images(1))
    wait_for(lambda: batcher._queued == 0, what="the first batch to start")
    kept, dropped, last = (batcher.submit(images(v))[0] for v in (2, 3, 4))
    assert dropped.cancel()
    engine.steps.release(2)
    assert [f.result(5).tolist() for f in (first, kept, last)] == [[[1.0]], [[2.0]], [[4.0]]]
    assert engine.sizes == [1, 2]  # the dropped image never reached the engine


def test_a_failed_pass_fails_its_group_and_those_after_it(stepped: Any) -> None:
    engine, batcher, _ = stepped
    batcher.submit(images(1))
    wait_for(lambda: batcher._queued == 0, what="the first batch to start")
    done, failed, after = (batcher.submit(images(*values))[0] for values in ([2] * 8, [99], [3]))
    engine.steps.release(3)
    assert done.result(5).ravel().tolist() == [2.0] * 8
    for future in (failed, after):
        with pytest.raises(RuntimeError, match="the engine failed"):
            future.result(5)
    engine.steps.release()
    assert batcher.submit(images(5))[0].result(5).tolist() == [[5.0]]  # the batcher goes on


def test_stopping_runs_what_is_queued_and_refuses_the_rest(gated: Any) -> None:
    engine, batcher = gated
    batcher.submit(images(1))
    wait_for(lambda: batcher._queued == 0, what="the engine to be busy")
    (queued,) = batcher.submit(images(2))
    threading.Timer(0.2, engine.gate.set).start()
    batcher.stop()
    assert queued.result(0).tolist() == [[2.0]]
    with pytest.raises(BatcherStopped):
        batcher.submit(images(3))


def test_a_full_queue_is_a_503_with_retry_after(tmp_path: Any, run_app: Any) -> None:
    seed_classes(tmp_path, per_label=4)
    with run_app(http={"port": 0, "batching": {"max_batch_size": 2, "max_enqueued_batches": 1}}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        body = json.dumps({"instances": [{"b64": base64.b64encode(image_bytes("red", 9)).decode()}]}).encode()
        with ThreadPoolExecutor(8) as pool:
            with app.extractor.turns.turn(urgent=False):  # the engine is busy elsewhere (caching, say)
                futures = [pool.submit(call, app, "POST", f"{MODEL}:predict", body) for _ in range(8)]
                # at most one batch of 2 in the engine's hands and 2 images queued: the rest are refused at once
                wait_for(lambda: sum(f.done() for f in futures) >= 4, what="refusals while the engine is busy")
            replies = [f.result() for f in futures]
        refused = [r for r in replies if r[0] == 503]
        assert len(refused) >= 4 and all(int(h["retry-after"]) >= 1 and "queue is full" in b["error"]
                                          for _, h, b in refused)
        assert {r[0] for r in replies} == {200, 503}  # the ones let in were answered once the engine was free
        assert call(app, "POST", f"{MODEL}:predict", body)[0] == 200
        assert "retraind_batch_rejections_total 4.0" in call_text(app, "/metrics") or len(refused) > 4


def call_text(app: Any, path: str) -> str:
    assert app.http is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{app.http.port}{path}", timeout=10) as response:
        return str(response.read().decode())


def test_the_inbox_is_served_under_http_load(tmp_path: Any, run_app: Any) -> None:
    """Neither side starves: inbox files are classified while clients keep the HTTP batcher busy."""
    seed_classes(tmp_path, per_label=4)
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
        body = json.dumps({"instances": [{"b64": base64.b64encode(image_bytes("red", i)).decode()}
                                         for i in range(16)]}).encode()
        stop, answered = threading.Event(), []

        def client() -> None:
            while not stop.is_set():
                answered.append(call(app, "POST", f"{MODEL}:predict", body)[0])

        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(client)
            try:
                wait_for(lambda: len(answered) >= 4, what="HTTP load")
                for i in range(6):
                    write_image(tmp_path / "data" / "inbox" / f"in-{i}.jpg", "blue", seed=700 + i)
                outbox = tmp_path / "data" / "outbox"
                wait_for(lambda: len(list(outbox.glob("*/*.jpg"))) == 6, timeout=30, what="the inbox under load")
            finally:
                stop.set()
        assert set(answered) == {200}


def test_the_engine_is_warm_before_the_server_answers(run_app: Any, tiny: TinyBackbonePlugin) -> None:
    """The engine runs a black image and a full batch of them before the HTTP server starts, so /readyz never
    says ready while the first forward pass of a batch size (set-up, buffers) is still to come."""
    with run_app(http={"port": 0, "batching": {"max_batch_size": 8}}) as app:
        assert tiny.warm_ups == [1, 8]
        code, _, body = call(app, "GET", "/readyz")
        assert (code, body) == (503, {"ready": False, "model_version": 0})  # no model yet


def test_a_request_across_batches_is_answered_in_order(tmp_path: Any, run_app: Any) -> None:
    """A request of more images than a batch takes is decoded in parallel and split across batches; its rows
    come back in its own order, the same as each image sent alone, and one image that is not one fails the
    request with a 422 that names it, leaving the server serving."""
    seed_classes(tmp_path, per_label=4)
    with run_app(http={"port": 0, "batching": {"max_batch_size": 2}}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        files = [image_bytes(label, 40 + i) for i, label in enumerate(["red", "blue", "red", "blue", "red"])]

        def predict(*images: bytes) -> Any:
            instances = [{"b64": base64.b64encode(data).decode()} for data in images]
            return call(app, "POST", f"{MODEL}:predict", json.dumps({"instances": instances}).encode())

        code, _, together = predict(*files)
        assert code == 200 and len(together["predictions"]) == 5
        alone = [predict(data)[2]["predictions"][0] for data in files]
        assert np.allclose(together["predictions"], alone, atol=1e-5)
        assert np.argmax(together["predictions"], axis=1).tolist() != [0] * 5  # red and blue told apart
        code, _, body = predict(files[0], b"not an image at all", files[1])
        assert code == 422 and body["error"].startswith("instance 1: not a usable image"), body
        assert predict(files[0])[0] == 200
