"""Field cases of image decoding (issue 11): what real users' files carry besides pixels. Each test names the
kind of fault it covers and makes its input here, with Pillow, numpy or a few hand-written bytes."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from daemon.backbone import PREPROCESSING
from daemon.images import ImageRejected
from daemon.store import Store
from plugins.pillow_decoder import retraind_decode_image
from tests.conftest import seed_classes, wait_for
from tests.test_daemon_e2e import results, scrape
from tests.test_reliability_input import bomb, encoded, pixels, png

REPO = Path(__file__).resolve().parents[1]
SIZE = (32, 32)


def decode(data: bytes, size: tuple[int, int] = SIZE, max_pixels: int = 10**8) -> np.ndarray:
    return retraind_decode_image(data, size, max_pixels, PREPROCESSING)


def saved(image: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def xmp_png(array: np.ndarray, kind: str, size: int = 2 << 20) -> bytes:
    """A PNG whose XMP text chunk inflates to `size` bytes; 2 KB on disk (`zip=True` compresses it)."""
    info = PngInfo()
    packet = "<x:xmpmeta>" + "<rdf:li>stEvt:instanceID</rdf:li>" * (size // 32) + "</x:xmpmeta>"
    if kind == "iTXt":
        info.add_itxt("XML:com.adobe.xmp", packet, zip=True)
    else:
        info.add_text("XML:com.adobe.xmp", packet, zip=True)
    return saved(Image.fromarray(array), "PNG", pnginfo=info)


def test_huge_metadata_chunks_are_not_pixels(tmp_path: Path, run_app: Any) -> None:
    """KIND: metadata size is not pixel size. A picture whose text metadata (a zTXt or iTXt XMP packet that
    inflates to 2 MiB, as Photoshop's edit history does) is over Pillow's text-chunk limit is a sound picture:
    it decodes to the same pixels as without the metadata, is trained on in classes/ and classified from the
    inbox. The pixel limit (decompression bombs) still holds whatever metadata a file carries."""
    red = pixels("red", 1, (320, 240))
    plain = decode(saved(Image.fromarray(red)))
    for kind in ("zTXt", "iTXt"):
        assert np.array_equal(decode(xmp_png(red, kind)), plain), kind
    with pytest.raises(ImageRejected) as bomb:
        decode(xmp_png(red, "zTXt"), max_pixels=320 * 240 - 1)
    assert bomb.value.reason == "too_large"

    data = tmp_path / "data"
    seed_classes(tmp_path)
    for i in range(3):
        (data / "classes" / "red" / f"xmp-{i}.png").write_bytes(xmp_png(pixels("red", 10 + i, (320, 240)), "iTXt"))
    with run_app(classify={"confidence_threshold": 0.0}) as app:
        version = wait_for(lambda: app.serving.version, what="first model")
        assert all(app.store.catalog()[f"red/xmp-{i}.png"].ok for i in range(3))
        (data / "inbox" / "xmp.png").write_bytes(xmp_png(pixels("red", 20, (320, 240)), "zTXt"))
        wait_for(lambda: results(tmp_path), what="the XMP-laden PNG classified")
        rejected = scrape(app).get("retraind_rejected_files_total{reason=corrupt}", 0)
    assert sum(version.metrics["images"]["red"].values()) == 15
    assert results(tmp_path)[0]["label"] == "red" and rejected == 0


def exif_with_bad_rational(orientation: int) -> bytes:
    """An EXIF block by hand (Pillow will not write it): Orientation, and XResolution stored as SRATIONAL
    -1/0 (type 10, a negative value over a zero denominator, as some phone firmware writes)."""
    data_offset = 8 + 2 + 2 * 12 + 4
    entries = struct.pack("<HHII", 0x0112, 3, 1, orientation) + struct.pack("<HHII", 0x011A, 10, 1, data_offset)
    ifd = struct.pack("<H", 2) + entries + struct.pack("<I", 0)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<ii", -1, 0)


def test_malformed_exif_never_rejects_and_orientation_is_applied_alone() -> None:
    """KIND: malformed metadata never rejects a decodable image. A 400×300 JPEG whose EXIF says Orientation 6
    beside an XResolution of -1/0 (Pillow's EXIF transpose raises on rewriting it) comes out upright,
    300×400, like the same picture turned by hand; an EXIF block that is garbage only loses its orientation."""
    left_red_right_blue = np.concatenate([pixels("red", 1, (200, 300)), pixels("blue", 2, (200, 300))], axis=1)
    sideways = encoded(left_red_right_blue, "JPEG", exif=exif_with_bad_rational(6), quality=95)
    upright = np.asarray(Image.open(io.BytesIO(sideways)).transpose(Image.Transpose.ROTATE_270))
    assert upright.shape == (400, 300, 3)
    decoded = decode(sideways, (300, 400))
    assert decoded.shape == (400, 300, 3)
    assert np.abs(decoded.astype(int) - upright).mean() < 2  # red above blue, as displayed
    top, bottom = decoded[:190].reshape(-1, 3).mean(axis=0), decoded[210:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]

    garbage_exif = b"Exif\0\0MM\0*" + bytes(range(200))
    plain = encoded(left_red_right_blue, "JPEG", quality=95)
    assert np.array_equal(decode(encoded(left_red_right_blue, "JPEG", exif=garbage_exif, quality=95)),
                          decode(plain))


def logo_variants() -> dict[str, bytes]:
    """The same grey logo on a transparent background, stored every way PNG, GIF and WebP allow: an alpha
    channel (RGBA, LA, WebP), a palette's transparency (P, GIF), and a tRNS colour key (RGB, L, 16-bit L)."""
    shape = np.zeros((40, 48), dtype=bool)
    shape[10:30, 12:36] = True
    shape[18:22, 4:44] = True
    grey = np.where(shape, 90, 0).astype(np.uint8)  # the key colour (0) is never a logo pixel
    rgba = np.zeros((40, 48, 4), dtype=np.uint8)
    rgba[shape] = (90, 90, 90, 255)
    rgba[~shape] = (0, 0, 0, 0)
    rgba_image = Image.fromarray(rgba, "RGBA")
    palette = Image.fromarray(grey).convert("P")
    wide = grey.astype(">u2") * 257
    return {
        "RGBA": saved(rgba_image),
        "LA": saved(rgba_image.convert("LA")),
        "WebP RGBA": saved(rgba_image, "WEBP", lossless=True),
        "P + tRNS": saved(palette, transparency=0),
        "GIF": saved(palette, "GIF", transparency=0),
        "RGB + tRNS": saved(Image.fromarray(np.stack([grey] * 3, axis=-1)), transparency=(0, 0, 0)),
        "L + tRNS": saved(Image.fromarray(grey), transparency=0),
        "I;16 + tRNS": png(48, 40, 16, 0, (row.tobytes() for row in wide), trns=struct.pack(">H", 0)),
    }


def test_transparency_in_any_mode_is_flattened_on_one_background() -> None:
    """KIND: any transparency, in any mode (an alpha channel in RGBA/LA/PA, a palette's transparency, a tRNS
    colour key in RGB/L/16-bit grey) is laid on the same white background, so one picture stored in any of
    these ways gives identical arrays (it was white under alpha and black under a colour key)."""
    arrays = {name: decode(data) for name, data in logo_variants().items()}
    reference = arrays["RGBA"]
    assert reference[0, 0].tolist() == [255, 255, 255]  # the transparent corner is white
    assert reference[16, 16].tolist() == [90, 90, 90]  # the logo keeps its colour
    assert {name for name, array in arrays.items() if not np.array_equal(array, reference)} == set()


# --- formats: an allow-list, no external program ------------------------------------------------------------

FAKE_GS = """#!/bin/sh
echo "$0 $*" >> "{marker}"
exit 1
"""
CHILD_CONFIG = """\
data_root: data
backbone: {{name: colourgrid, batch_size: 8}}
training: {{quiet_period_seconds: 0.2}}
watch: {{settle_seconds: 0.1, rescan_interval_seconds: 0}}
classify: {{confidence_threshold: 0.0}}
split: {{validation_percentage: 20, testing_percentage: 0}}
http: {{port: {port}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_child(root: Path, port: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A real daemon process (tests/crash_child.py, the colourgrid backbone) on `root/data`, HTTP on `port`."""
    (root / "config.yaml").write_text(CHILD_CONFIG.format(port=port))
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with (root / "child.log").open("ab") as log:
        return subprocess.Popen([sys.executable, "-m", "tests.crash_child", "config.yaml"], cwd=root,
                                stdout=log, stderr=subprocess.STDOUT, env=env)


def stop_child(process: subprocess.Popen[bytes], root: Path) -> None:
    process.terminate()
    assert process.wait(timeout=60) == 0, (root / "child.log").read_text(errors="replace")[-3000:]


def post(port: int, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def mpo(array: np.ndarray) -> bytes:
    """A camera JPEG with a second picture (Multi-Picture Object), which Pillow reports as MPO."""
    first, second = Image.fromarray(array), Image.fromarray(array[::2, ::2])
    data = saved(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    return data


def test_only_allowed_formats_are_parsed_and_no_external_program_runs(tmp_path: Path) -> None:
    """KIND: the decoder opens an allow-list of formats, nothing else is parsed, and no external program ever
    runs on input. An EPS file (Pillow would hand it to Ghostscript) put in inbox/, in classes/ and in an HTTP
    classify body, with a fake `gs` first on the daemon's PATH, never runs it and is refused as `unsupported`
    (not `corrupt`: nothing is damaged). A camera JPEG that Pillow reports as MPO is still classified."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran.txt"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(FAKE_GS.format(marker=marker))
    (bin_dir / "gs").chmod(0o755)
    eps = saved(Image.fromarray(pixels("red", 1)), "EPS")
    data = tmp_path / "data"
    for label in ("red", "blue"):
        for i in range(8):
            (data / "classes" / label / f"{label}-{i}.png").parent.mkdir(parents=True, exist_ok=True)
            (data / "classes" / label / f"{label}-{i}.png").write_bytes(encoded(pixels(label, 30 + i), "PNG"))
    (data / "classes" / "red" / "drawing.eps").write_bytes(eps)
    port = free_port()
    child = start_child(tmp_path, port, {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    try:
        wait_for(lambda: (data / "state" / "models" / "CURRENT").exists() or child.poll() is not None,
                 timeout=60, what="a first model")
        (data / "inbox" / "drawing.eps").write_bytes(eps)
        (data / "inbox" / "camera.jpg").write_bytes(mpo(pixels("blue", 40, (64, 48))))
        wait_for(lambda: (data / "rejected" / "drawing.eps.error.json").exists() and results(tmp_path),
                 what="the EPS rejected and the MPO classified")
        status, body = post(port, "/v1/models/retraind:classify", eps)
    finally:
        stop_child(child, tmp_path)
    assert not marker.exists(), f"the fake Ghostscript ran: {marker.read_text()}"
    assert (status, "unsupported" in body["error"]) == (422, True), body
    assert json.loads((data / "rejected" / "drawing.eps.error.json").read_text())["reason"] == "unsupported"
    store = Store(data / "state" / "store.sqlite")
    try:
        assert not store.catalog()["red/drawing.eps"].ok
    finally:
        store.close()
    assert "red/drawing.eps: skipped for training: not an image" in (tmp_path / "child.log").read_text()
    assert [(r["file"], r["label"]) for r in results(tmp_path)] == [("camera.jpg", "blue")]


def heic(array: np.ndarray) -> bytes:
    """An HEIC file as an iPhone writes it (HEVC in HEIF), made with pillow-heif's own encoder."""
    import pillow_heif

    buffer = io.BytesIO()
    pillow_heif.from_pillow(Image.fromarray(array)).save(buffer, format="HEIF", quality=90)
    return buffer.getvalue()


def test_heic_and_avif_photos_are_read(tmp_path: Path, run_app: Any) -> None:
    """KIND: the photo formats phones write are inside the allow-list: HEIC/HEIF (pillow-heif, registered
    explicitly) is decoded in classes/ and inbox/; AVIF (Pillow's own plugin) keeps working."""
    data = tmp_path / "data"
    seed_classes(tmp_path)
    for i in range(3):
        (data / "classes" / "red" / f"IMG_{i:04}.HEIC").write_bytes(heic(pixels("red", 50 + i)))
    with run_app(classify={"confidence_threshold": 0.0}) as app:
        version = wait_for(lambda: app.serving.version, what="first model")
        catalog = app.store.catalog()
        (data / "inbox" / "IMG_0100.HEIC").write_bytes(heic(pixels("blue", 60)))
        (data / "inbox" / "photo.avif").write_bytes(saved(Image.fromarray(pixels("red", 61)), "AVIF", quality=90))
        wait_for(lambda: len(results(tmp_path)) == 2, what="the HEIC and AVIF photos classified")
    assert all(catalog[f"red/IMG_{i:04}.HEIC"].ok for i in range(3))
    assert sum(version.metrics["images"]["red"].values()) == 15
    assert {r["file"]: r["label"] for r in results(tmp_path)} == {"IMG_0100.HEIC": "blue", "photo.avif": "red"}


def test_the_pixel_limit_is_watch_max_image_pixels_whatever_pillows_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """KIND: `watch.max_image_pixels` is the one pixel limit. Pillow keeps a process-wide limit of its own
    (89,478,485 by default: a warning above it, an error above twice it); it refused a 9472×9472 scan that a
    user's `max_image_pixels: 100000000` allows, and named its own figure, not the key. Here Pillow's global is
    set low (as its default is below such a setting) so the pictures stay small: one between Pillow's limit and
    the configured one decodes, one above twice Pillow's limit too, and one above the configured limit is
    `too_large` with a message naming the key, and no other limit (Pillow's text said `exceeds limit of
    178956970 pixels`, twice the key's default, beside `watch.max_image_pixels=89478485`)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 60):  # 1,600 px: Pillow's warning band; 3,600 px: above twice its limit (its error)
        assert decode(saved(Image.fromarray(pixels("red", side, (side, side)))), max_pixels=5000).shape == (32, 32, 3)
    for data in (saved(Image.fromarray(pixels("red", 1, (80, 80)))), bomb()):  # 6,400 px; 30000×30000
        with pytest.raises(ImageRejected) as refused:
            decode(data, max_pixels=5000)
        assert refused.value.reason == "too_large" and "watch.max_image_pixels=5000" in str(refused.value)
        assert "10000" not in str(refused.value) and "limit of" not in str(refused.value), str(refused.value)
