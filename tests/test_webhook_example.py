"""The example third-party plugin in examples/retraind-webhook: installed with pip, found through the `retraind`
entry-point group, configured by its own section of the config, it POSTs each result to a real HTTP server on
loopback; a failing receiver stops nothing; a bad setting is a config error naming its key."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import pytest

from daemon.cli import main
from daemon.config import EX_CONFIG, ConfigError
from daemon.plugin_manager import make_plugin_manager
from tests.conftest import seed_classes, wait_for, write_image
from tests.test_cli import write_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "retraind-webhook"


class Receiver:
    """A webhook receiver on 127.0.0.1 that records what it is sent and answers with `status`."""

    def __init__(self, status: int) -> None:
        self.posts: list[tuple[dict[str, str], dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((dict(self.headers), json.loads(body)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver")

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install` of a copy of the example into a folder of its own (the shared venv is left alone)."""
    pytest.importorskip("setuptools", reason="building the example needs setuptools in this environment")
    root = tmp_path_factory.mktemp("webhook")
    source, site = root / "src", root / "site"
    shutil.copytree(EXAMPLE, source)  # building writes egg-info beside the sources: not into the checkout
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(site), str(source)], check=True, timeout=300)
    return site


@pytest.fixture
def webhook_plugin(installed: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(installed))
    yield
    sys.modules.pop("retraind_webhook", None)


def results(data: Path) -> list[dict[str, Any]]:
    path = data / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_installed_plugin_is_found_by_its_entry_point(webhook_plugin: None) -> None:
    pm = make_plugin_manager()
    assert pm.get_plugin("webhook") is not None
    assert "webhook" in [impl.plugin_name for impl in pm.hook.retraind_on_result.get_hookimpls()]
    assert make_plugin_manager(disabled=["webhook"]).get_plugin("webhook") is None


def test_posts_every_result(webhook_plugin: None, tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    seed_classes(tmp_path)
    with Receiver(204) as receiver, run_app(plugins={"webhook": {"url": receiver.url}}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        for i, colour in enumerate(("red", "blue", "red")):
            write_image(data / "inbox" / f"in{i}.jpg", colour, seed=6000 + i)
        wait_for(lambda: len(receiver.posts) == 3, what="three webhook posts")
    by_id = {record["id"]: record for record in results(data)}
    for headers, body in receiver.posts:
        assert headers["Content-Type"] == "application/json"
        assert headers["Idempotency-Key"] == body["id"]
        assert body == by_id[body["id"]]
    assert sorted(body["file"] for _, body in receiver.posts) == ["in0.jpg", "in1.jpg", "in2.jpg"]


def test_a_failing_receiver_stops_nothing(webhook_plugin: None, tmp_path: Path, run_app: Any) -> None:
    data = tmp_path / "data"
    seed_classes(tmp_path, per_label=4)
    with Receiver(500) as receiver, run_app(plugins={"webhook": {"url": receiver.url}}) as app:
        wait_for(lambda: app.serving.version, what="first model")
        write_image(data / "inbox" / "in.jpg", "blue", seed=6100)
        wait_for(lambda: len(results(data)) == 1, what="the result record")
        errors = app.metrics.registry.get_sample_value(
            "retraind_plugin_errors_total", {"hook": "retraind_on_result", "plugin": "webhook"})
    assert len(receiver.posts) == 1 and errors == 1
    assert (data / "outbox" / "blue" / "in.jpg").exists()


@pytest.mark.parametrize(("section", "message"), [
    ({"webhook": {"urll": "http://127.0.0.1:1/"}}, "plugins.webhook.urll: unknown key (allowed: timeout_seconds, url)"),
    ({"webhook": {"url": 8080}}, "plugins.webhook.url: expected str, got int 8080"),
    ({"webhook": {"url": "ftp://example.org/x"}}, "plugins.webhook: url: 'ftp://example.org/x' is not an http"),
    ({"webhook": {"timeout_seconds": 0}}, "plugins.webhook: timeout_seconds: 0.0 is out of range (0, 600]"),
    ({"webhok": {"url": "http://127.0.0.1:1/"}}, "plugins.webhok: no loaded plugin of that name takes settings"),
])
def test_bad_settings_name_the_key(webhook_plugin: None, section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        make_plugin_manager(settings=section)


def test_settings_of_a_disabled_plugin_are_kept_quietly(webhook_plugin: None) -> None:
    pm = make_plugin_manager(disabled=["webhook"], settings={"webhook": {"urll": "kept for later"}})
    assert pm.get_plugin("webhook") is None


def test_check_config_finds_a_bad_setting(webhook_plugin: None, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, plugins={"webhook": {"url": "127.0.0.1:8080"}})
    assert main(["--config", str(config), "check-config"]) == EX_CONFIG
    err = capsys.readouterr().err
    assert err == "retraind: plugins.webhook: url: '127.0.0.1:8080' is not an http:// or https:// URL\n"
