"""With the default backbone's conversion cached, serving never imports TensorFlow or Keras: `retraind run`
(training, an inbox file, an HTTP classify) and `retraind classify` in real processes, checked on their own
`sys.modules` at exit. At rest after a restart, nothing heavy loads at all: SciPy and Matplotlib wait for the
trainer's first fit and plot."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from daemon.engines import GPU_DEVICE_NODES
from tests.conftest import Lite0Conversion, image_bytes, seed_classes, wait_for, write_image
from tests.test_cli import write_config

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "scipy", "matplotlib")
#: `retraind ARGS...` that writes, at exit, which of HEAVY its process imported to the file in argv[1].
RUNNER = f"""
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps([m for m in {HEAVY!r} if m in sys.modules])))
from daemon.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, data: bytes | None = None) -> int:
    try:
        with urllib.request.urlopen(url, data=data, timeout=10) as response:
            return int(response.status)
    except (urllib.error.URLError, ConnectionError):
        return 0


def retraind(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    heavy = tmp_path / "heavy.json"
    heavy.unlink(missing_ok=True)
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(heavy), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def imported(tmp_path: Path, child: subprocess.Popen[bytes]) -> list[str]:
    """Stop `child` (SIGTERM, as systemd does) and return the heavy modules it held."""
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err.decode()[-3000:]
    return list(json.loads((tmp_path / "heavy.json").read_text()))


def serve_until_ready(tmp_path: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    child = retraind(tmp_path, "--config", str(config), "run")
    wait_for(lambda: child.poll() is not None or get(f"http://127.0.0.1:{port}/readyz") == 200, timeout=120,
             what="a model served")
    assert child.poll() is None, child.communicate()[1].decode()[-3000:]
    return child


def test_serving_with_the_cached_engine_imports_no_tensorflow(tmp_path: Path,
                                                               lite0_conversion: Lite0Conversion) -> None:
    # The shipped `auto` engine; on a machine with a GPU driver, auto asks TensorFlow, so name the engine there.
    engine = "tflite" if any(os.path.exists(node) for node in GPU_DEVICE_NODES) else "auto"
    port = free_port()
    config = write_config(tmp_path, backbone={"name": "efficientnet_lite0", "engine": engine},
                          http={"port": port})
    shutil.copytree(lite0_conversion.weights, tmp_path / "data" / "state" / "weights")
    seed_classes(tmp_path, per_label=5)
    classify = f"http://127.0.0.1:{port}/v1/models/retraind:classify"

    child = serve_until_ready(tmp_path, config, port)  # trains the first model
    write_image(tmp_path / "data" / "inbox" / "which.jpg", "blue", seed=4242)
    wait_for(lambda: (tmp_path / "data" / "results.jsonl").exists(), what="a result record")
    assert get(classify, image_bytes("red", 77)) == 200
    assert not {"tensorflow", "keras"} & set(imported(tmp_path, child))

    child = serve_until_ready(tmp_path, config, port)  # a restart: the model is served at once
    assert get(classify, image_bytes("red", 78)) == 200
    assert imported(tmp_path, child) == []

    picture = write_image(tmp_path / "one.jpg", "red", seed=79)
    child = retraind(tmp_path, "--config", str(config), "classify", str(picture))
    child.wait(timeout=120)
    assert child.stdout is not None and b"(score = " in child.stdout.read()
    assert imported(tmp_path, child) == []
