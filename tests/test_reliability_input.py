"""Bad and odd input through a real daemon: every readable image is classified correctly, every unreadable one
ends in `rejected/` with a record saying why, counted by reason; in `classes/` bad files are skipped with a
warning and training goes on. The daemon keeps running throughout."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from daemon import images
from daemon.backbone import PREPROCESSING
from daemon.scanner import walk_files
from plugins.pillow_decoder import retraind_decode_image
from tests.conftest import seed_classes, wait_for
from tests.test_daemon_e2e import results, scrape

RGB = {"red": (220, 30, 30), "blue": (30, 40, 220), "grey": (128, 128, 128)}


def pixels(colour: str | tuple[int, int, int], seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A noisy image of a named colour (`RGB`) or of any RGB triple; `seed` makes each one different content."""
    rng = np.random.default_rng(seed)
    base = np.array(RGB[colour] if isinstance(colour, str) else colour, dtype=np.int16)
    noisy: np.ndarray = np.clip(base + rng.integers(-25, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return noisy


def encoded(array: np.ndarray, fmt: str, mode: str | None = None, **options: Any) -> bytes:
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: Iterable[bytes], trns: bytes = b"") -> bytes:
    """A PNG written by hand, for what Pillow will not write: 16-bit RGB (with a `trns` colour key), and a
    30000×30000 bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(1)
    idat = b"".join(packer.compress(b"\0" + row) for row in rows) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    transparency = chunk(b"tRNS", trns) if trns else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + transparency + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png16(colour: str, seed: int, grey: bool = False) -> bytes:
    wide = pixels(colour, seed).astype(">u2") * 257
    array = wide[..., 0] if grey else wide
    return png(48, 40, 16, 0 if grey else 2, (row.tobytes() for row in array))


def bomb() -> bytes:
    """30000×30000 one-bit pixels: 110 KB on disk, 2.7 GB as RGB once decoded."""
    row = bytes(30000 // 8)
    return png(30000, 30000, 1, 0, (row for _ in range(30000)))


def animated_gif() -> bytes:
    frames = [Image.fromarray(pixels(colour, 60 + i)) for i, colour in enumerate(("red", "blue", "blue"))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def exif_rotated(array: np.ndarray) -> bytes:
    """A JPEG stored sideways whose EXIF orientation (6) says: turn 90° clockwise to display."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(array, "JPEG", exif=exif.tobytes())


def seed_three(data: Path, per_label: int = 10) -> None:
    for label in RGB:
        folder = data / "classes" / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            (folder / f"{label}-{i}.png").write_bytes(encoded(pixels(label, sum(map(ord, label)) + i), "PNG"))


def test_exif_orientation_is_applied() -> None:
    left_red_right_blue = np.concatenate([pixels("red", 1, (30, 40)), pixels("blue", 2, (30, 40))], axis=1)
    decoded = retraind_decode_image(exif_rotated(left_red_right_blue), (32, 32), 10**8, PREPROCESSING).astype(int)
    top, bottom = decoded[:14].reshape(-1, 3).mean(axis=0), decoded[18:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # displayed upright: red above blue


def test_sixteen_bit_keeps_its_brightness() -> None:
    dark = png(8, 8, 16, 0, (np.full(8, 40 * 257, ">u2").tobytes() for _ in range(8)))
    assert abs(int(retraind_decode_image(dark, (8, 8), 10**8, PREPROCESSING).mean()) - 40) <= 1


READABLE: dict[str, tuple[Callable[[], bytes], str]] = {  # inbox name -> (content, expected label)
    "png named.jpg": (lambda: encoded(pixels("red", 1), "PNG"), "red"),
    "webp-named.jpg": (lambda: encoded(pixels("blue", 2), "WEBP"), "blue"),
    "animated.gif": (animated_gif, "red"),  # the first frame counts
    "deep16.png": (lambda: png16("red", 3), "red"),
    "grey16.png": (lambda: png16("grey", 4, grey=True), "grey"),
    "cmyk.jpg": (lambda: encoded(pixels("blue", 5), "JPEG", "CMYK"), "blue"),
    "greyscale.jpg": (lambda: encoded(pixels("grey", 6), "JPEG", "L"), "grey"),
    "rotated.jpg": (lambda: exif_rotated(pixels("red", 7, (60, 40))), "red"),
    "with space.jpg": (lambda: encoded(pixels("blue", 8), "JPEG"), "blue"),
    "ünïcödé 写真.jpg": (lambda: encoded(pixels("red", 9), "JPEG"), "red"),
    "-leading-dash.jpg": (lambda: encoded(pixels("blue", 10), "JPEG"), "blue"),  # hidden names: watch.ignore
    os.fsdecode(b"caf\xe9-latin1.jpg"): (lambda: encoded(pixels("grey", 11), "JPEG"), "grey"),
    "batch/one.jpg": (lambda: encoded(pixels("red", 12), "JPEG"), "red"),
    "batch/deeper/two.png": (lambda: encoded(pixels("blue", 13), "PNG"), "blue"),
}
UNREADABLE: dict[str, tuple[Callable[[], bytes], str]] = {  # inbox name -> (content, reason)
    "empty.jpg": (lambda: b"", "empty"),
    "truncated.jpg": (lambda: encoded(pixels("red", 20), "JPEG")[:700], "corrupt"),
    "random.jpg": (lambda: np.random.default_rng(21).bytes(3000), "unsupported"),
    "notes.txt": (lambda: b"this is a text file, not a picture\n", "unsupported"),
    "bomb.png": (bomb, "too_large"),
    "huge.bmp": (lambda: bytes(300_001), "too_large"),
}


def test_bad_and_odd_inbox_files(tmp_path: Path, run_app: Any) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    seed_three(data)
    outside.mkdir()
    (outside / "target.jpg").write_bytes(encoded(pixels("blue", 30), "JPEG"))
    moved_folder = outside / "folder"
    moved_folder.mkdir()
    (moved_folder / "inside.jpg").write_bytes(encoded(pixels("grey", 31), "JPEG"))
    with run_app(classify={"confidence_threshold": 0.0}, watch={"max_file_bytes": 300_000}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        inbox = data / "inbox"
        for name, (make, _) in {**READABLE, **UNREADABLE}.items():
            (inbox / name).parent.mkdir(parents=True, exist_ok=True)
            (inbox / name).write_bytes(make())
        os.symlink("../../outside/target.jpg", inbox / "link.jpg")  # relative: must still resolve once moved
        os.symlink("loop.jpg", inbox / "loop.jpg")
        os.symlink("nowhere.jpg", inbox / "dangling.jpg")
        os.rename(moved_folder, inbox / "folder")
        wait_for(lambda: not list(walk_files(inbox)), timeout=60, what="an empty inbox")
        assert app.alive()
        metrics = scrape(app)

    by_file = {record["file"]: record for record in results(tmp_path)}
    # a name that is not UTF-8 is filed, and recorded, with U+FFFD for its stray bytes (daemon.atomic.utf8_name)
    expected = {Path(name).name.replace("\udce9", "\ufffd"): label for name, (_, label) in READABLE.items()}
    expected |= {"link.jpg": "blue", "inside.jpg": "grey"}
    assert {name: record["label"] for name, record in by_file.items()} == expected
    for record in by_file.values():
        destination = Path(record["destination"])
        assert destination.parent == data / "outbox" / record["label"]
        assert json.loads(destination.with_name(destination.name + ".json").read_text()) == record
    assert Path(by_file["link.jpg"]["destination"]).resolve() == outside / "target.jpg"

    reasons = {**{name: reason for name, (_, reason) in UNREADABLE.items()},
               "loop.jpg": "unreadable", "dangling.jpg": "unreadable"}
    rejected = data / "rejected"
    for name, reason in reasons.items():
        assert os.path.lexists(rejected / name), name
        record = json.loads((rejected / f"{name}.error.json").read_text())
        assert record["reason"] == reason and record["file"] == name and record["error"]
    assert sorted(p.name for p in rejected.iterdir()) == sorted([*reasons, *(f"{n}.error.json" for n in reasons)])
    counted = {reason: metrics.get(f"retraind_rejected_files_total{{reason={reason}}}", 0) for reason in
               set(reasons.values())}
    assert counted == {reason: list(reasons.values()).count(reason) for reason in reasons.values()}


def test_bad_files_in_classes_are_skipped_and_training_goes_on(
    tmp_path: Path, run_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    seed_three(data, per_label=8)
    red = data / "classes" / "red"
    bad = {"empty.jpg": b"", "truncated.jpg": encoded(pixels("red", 40), "JPEG")[:600],
           "random.jpg": np.random.default_rng(41).bytes(2000), "notes.txt": b"not an image", "bomb.png": bomb()}
    for name, content in bad.items():
        (red / name).write_bytes(content)
    os.symlink("loop.jpg", red / "loop.jpg")
    (red / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are not training images
    (red / os.fsdecode(b"caf\xe9.jpg")).write_bytes(encoded(pixels("red", 42), "JPEG"))
    (red / "nested").mkdir()
    (red / "nested" / "deep.png").write_bytes(encoded(pixels("red", 43), "PNG"))
    with caplog.at_level(logging.WARNING), run_app() as app:
        version = wait_for(lambda: app.serving.version, what="a model despite the bad files")
        catalog = app.store.catalog()
        metrics = scrape(app)
        (data / "inbox" / "check.jpg").write_bytes(encoded(pixels("red", 44), "JPEG"))
        wait_for(lambda: results(tmp_path), what="a classification with that model")
    assert version.labels == ("blue", "grey", "red")
    assert results(tmp_path)[0]["label"] == "red"
    assert {rel: entry.ok for rel, entry in catalog.items() if not entry.ok} == {
        f"red/{name}": False for name in [*bad, "loop.jpg"]}
    assert catalog["red/nested/deep.png"].ok and version.metrics["images"]["red"]["train"] + \
        version.metrics["images"]["red"]["validation"] == 9
    skipped = {r.getMessage().split(":")[0] for r in caplog.records if "skipped for training" in r.getMessage()}
    assert skipped == {str(red / name) for name in [*bad, "loop.jpg", os.fsdecode(b"caf\xe9.jpg")]}
    assert sum(v for k, v in metrics.items() if k.startswith("retraind_rejected_files_total{")) == len(skipped)


def test_same_bad_content_twice_is_rejected_twice(tmp_path: Path, run_app: Any) -> None:
    """Content is decoded once per hash: its rejection must reach every file that holds it."""
    data = tmp_path / "data"
    seed_classes(tmp_path)
    (data / "classes" / "red" / "bad-1.jpg").write_bytes(b"garbage!!")
    (data / "classes" / "red" / "bad-2.jpg").write_bytes(b"garbage!!")
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
        catalog = app.store.catalog()
        assert not catalog["red/bad-1.jpg"].ok and not catalog["red/bad-2.jpg"].ok
        (data / "inbox" / "twin-a.jpg").write_bytes(b"not an image at all")
        (data / "inbox" / "twin-b.jpg").write_bytes(b"not an image at all")
        wait_for(lambda: sorted(p.name for p in (data / "rejected").glob("twin-*.jpg")) == ["twin-a.jpg", "twin-b.jpg"],
                 what="both twins rejected")


def interrupted_move(tmp_path: Path, run_app: Any, name: str, leave: Callable[[Path, bytes], None]) -> tuple[Path, Path]:
    """A daemon trained once, then an open journal entry for `inbox/<name>` moving to `outbox/red/<name>`, as
    a stop mid-move leaves it; `leave` puts what the stop left at the destination. Returns (source,
    destination)."""
    import hashlib

    from daemon.journal import file_identity
    from daemon.store import JournalEntry, Store

    data = tmp_path / "data"
    seed_classes(tmp_path)
    with run_app() as app:
        wait_for(lambda: app.serving.version, what="first model")
    content = (data / "classes" / "red" / "red-1.jpg").read_bytes()
    source = data / "inbox" / name
    destination = data / "outbox" / "red" / name
    destination.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(content)
    leave(destination, content)
    record = {"id": "r1", "file": name, "destination": str(destination), "label": "red",
              "confidence": 0.9, "top_k": [{"label": "red", "score": 0.9}], "model_version": 1,
              "backbone": "tiny", "sha256": hashlib.sha256(content).hexdigest(), "time": "2026-01-01T00:00:00"}
    store = Store(data / "state" / "store.sqlite")
    store.journal_begin(JournalEntry("r1", json.dumps(str(source)), json.dumps(str(destination)),
                                     json.dumps(record), "moving", file_identity(source)))
    store.close()
    return source, destination


def test_recovery_removes_a_source_left_by_an_interrupted_copy(tmp_path: Path, run_app: Any) -> None:
    """Across file systems a move is copy-then-unlink; a stop between the two left both files. Recovery
    must finish the move (remove the source) so the file is not classified a second time."""
    source, destination = interrupted_move(tmp_path, run_app, "copied.jpg", Path.write_bytes)
    with run_app() as app:
        wait_for(lambda: not app.store.journal_open(), what="the journal entry finished")
        assert not source.exists() and destination.exists()
        assert [json.loads(line)["id"] for line in (tmp_path / "data" / "results.jsonl").read_text().splitlines()] == ["r1"]


def test_links_to_folders_are_named_as_such_and_their_images_stay(
    tmp_path: Path, run_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """KIND: a symbolic link to a folder where an image is expected: `ln -s ~/Pictures/cats classes/cats` (a
    label), a link inside a label folder, or one dropped into the inbox. Links to folders are not followed
    (the inbox would move the files out of the linked folder), and the warning said "not inside a label
    folder" or "not a regular file", which does not tell the user why or what to do. INPUT: all three on a
    real daemon; each warning names the link as a link to a folder, and the linked images stay where they are."""
    data, photos = tmp_path / "data", tmp_path / "photos"
    seed_three(data)
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.jpg").write_bytes(encoded(pixels("grey", 50 + i), "JPEG"))
    os.symlink(photos, data / "classes" / "linked")
    os.symlink(photos, data / "classes" / "red" / "more")
    with caplog.at_level(logging.WARNING), run_app() as app:
        version = wait_for(lambda: app.serving.version, what="first model")
        os.symlink(photos, data / "inbox" / "dropped")
        wait_for(lambda: not os.path.lexists(data / "inbox" / "dropped"), what="the inbox link handled")
        assert app.alive()
    assert "linked" not in version.labels
    assert sorted(p.name for p in photos.iterdir()) == ["p0.jpg", "p1.jpg", "p2.jpg"]
    record = json.loads((data / "rejected" / "dropped.error.json").read_text())
    hint = "links to folders are not followed; move or copy the folder here instead"
    assert record["error"] == f"{data / 'inbox' / 'dropped'} is a link to the folder {photos}; {hint}"
    messages = [r.getMessage() for r in caplog.records]
    assert f"{data / 'classes' / 'linked'} is a link to the folder {photos}; {hint}" in messages
    assert f"{data / 'classes' / 'red' / 'more'}: skipped for training: {data / 'classes' / 'red' / 'more'} is a " \
        f"link to the folder {photos}; {hint}" in messages
    assert not any("not inside a label folder" in m or "not a regular file" in m for m in messages)


def _deep_folder(top: Path, depth: int = 22) -> bytes:
    """Folders nested below `top` until the path is over PATH_MAX (4096 bytes), made relative to each other
    (no path that long can be named at once); their innermost, relative to `top`."""
    names = [f"{i:02}" + "d" * 200 for i in range(depth)]
    here = os.open(top, os.O_RDONLY)
    for name in names:
        os.mkdir(name, dir_fd=here)
        inner = os.open(name, os.O_RDONLY, dir_fd=here)
        os.close(here)
        here = inner
    os.close(here)
    return os.fsencode(os.path.join(*names))


def test_a_folder_that_cannot_be_listed_is_named_once(
    tmp_path: Path, run_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """KIND: a folder the walk cannot enter. os.walk skips what it cannot list without a word, so an image
    below a path over PATH_MAX (a deep archive unpacked into the inbox; the same for a folder the daemon may
    not read) was never seen, never classified, never named. INPUT: such a folder in the inbox beside a plain
    image, with rescans every 0.3 s: the plain image is classified, the folder is named once (with what to do),
    and its image stays where it is."""
    data = tmp_path / "data"
    seed_three(data)
    (data / "inbox").mkdir()
    deep = _deep_folder(data / "inbox")
    with caplog.at_level(logging.WARNING, logger="daemon.scanner"), \
            run_app(classify={"confidence_threshold": 0.0}, watch={"rescan_interval_seconds": 0.3}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        (data / "inbox" / "plain.png").write_bytes(encoded(pixels("red", 70), "PNG"))
        wait_for(lambda: results(tmp_path), what="the plain image classified")
        time.sleep(1.0)  # a few rescans
    warned = [r.getMessage() for r in caplog.records if "cannot list the folder" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].endswith("its path is longer than the system allows (PATH_MAX, 4096 bytes): move it "
                              "higher up; the files in it are not seen")
    assert os.fsencode(data / "inbox") + b"/" + deep.split(b"/")[0] in os.fsencode(warned[0])
    assert [r["file"] for r in results(tmp_path)] == ["plain.png"]
    assert os.path.isdir(os.path.join(os.fsencode(data / "inbox"), deep.split(b"/")[0]))


def test_a_file_outside_the_label_folders_is_warned_about_once(
    tmp_path: Path, run_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """KIND: a file that no label folder holds (an image dropped into `classes/` itself, a link to a folder
    there) is in no catalog, so every periodic rescan found it again and warned again: one line per such file
    every `watch.rescan_interval_seconds`, for ever. INPUT: both, with rescans every 0.3 s; one warning each,
    and one more only when the file changes."""
    data = tmp_path / "data"
    seed_three(data)
    loose = data / "classes" / "loose.jpg"
    loose.write_bytes(encoded(pixels("red", 60), "JPEG"))
    os.symlink(data / "inbox", data / "classes" / "linked")
    with caplog.at_level(logging.WARNING, logger="daemon.indexer"), \
            run_app(watch={"rescan_interval_seconds": 0.3}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        time.sleep(2.0)  # about six rescans
        warned = [r.getMessage() for r in caplog.records]
        assert warned.count(f"{loose}: not inside a label folder (classes/<label>/...); ignored") == 1, warned
        assert sum("classes/linked is a link to the folder" in m for m in warned) == 1, warned
        loose.write_bytes(encoded(pixels("red", 61), "JPEG"))  # changed: worth one more line
        wait_for(lambda: sum("loose.jpg: not inside" in r.getMessage() for r in caplog.records) == 2,
                 what="a second warning for the changed file")


def test_a_file_that_grows_after_it_was_judged_is_refused_not_read_whole(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """KIND: a file is judged (regular, size under watch.max_file_bytes) and then read; what it holds by then
    may differ (a writer still appending, a name swapped for a link to /dev/zero). The read must stay within
    the limit it was judged by. INPUT: a writer appends 1 MB at the instant the size check has passed (the
    real check runs first; this only times an outside writer). Before the fix the whole file was read."""
    path = tmp_path / "growing.jpg"
    path.write_bytes(b"\xff\xd8" + b"x" * 998)
    real_check = images.check_size

    def check_then_grow(name: object, size: int, max_bytes: int) -> None:
        real_check(name, size, max_bytes)
        if size == 1000:  # the judgement of the file as it was; then the outside writer appends
            with path.open("ab") as fh:
                fh.write(b"y" * 1_000_000)

    monkeypatch.setattr(images, "check_size", check_then_grow)
    with pytest.raises(images.ImageRejected) as refused:
        images.read_image_file(path, max_bytes=10_000)
    assert refused.value.reason == "too_large" and "watch.max_file_bytes=10000" in str(refused.value)
    assert images.read_image_file(tmp_path / "growing.jpg", max_bytes=2_000_000).data.startswith(b"\xff\xd8")


def test_recovery_never_reads_a_fifo_found_under_a_journalled_name(tmp_path: Path, run_app: Any) -> None:
    """KIND: recovery hashes the files a journal entry names to learn whether a move landed; that read was
    unbounded and blocking (`read_bytes`), so anything found under the name — a FIFO, a link to a device, a
    file grown huge — stalled or flooded the start. INPUT: an open entry whose destination name is now a FIFO
    with no writer; the start must finish recovery (the entry dropped, the inbox file classified afresh)."""
    source, destination = interrupted_move(tmp_path, run_app, "piped.jpg", lambda path, _: os.mkfifo(path))
    started = threading.Event()

    def start() -> None:
        with run_app() as app:
            started.set()
            wait_for(lambda: not app.store.journal_open(), what="the journal entry finished")
            wait_for(lambda: not source.exists(), what="the inbox file classified afresh")

    runner = threading.Thread(target=start, daemon=True)
    runner.start()
    runner.join(timeout=60)
    stalled = runner.is_alive()
    if stalled:  # give the stalled reader its end of file, so the failing run ends
        os.close(os.open(destination, os.O_WRONLY | os.O_NONBLOCK))
        runner.join(timeout=60)
    assert started.is_set() and not stalled, "the start stalled reading the FIFO"
    assert stat.S_ISFIFO(os.lstat(destination).st_mode)
