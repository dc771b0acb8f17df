"""The HTTP server's defaults against what hostile pages, slow clients and odd bodies do, over real sockets:
DNS rebinding (a foreign `Host`), cross-site POSTs (CSRF), the bearer token beyond loopback, `Expect:
100-continue` (curl above 1 MiB), slow heads and bodies, hostile JSON; and the request metrics they leave."""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.app import App
from daemon.config import ConfigError
from tests.conftest import image_bytes, make_config
from tests.test_http_api import MODEL, call
from tests.tiny_backbone import TinyBackbonePlugin

RETRAIN = f"{MODEL}:retrain"
JSON = {"Content-Type": "application/json"}


def test_rebound_host_names_are_refused(run_app: Any) -> None:
    """Kind: DNS rebinding. A page on evil.example re-points its name at 127.0.0.1; the browser then sends
    `Host: evil.example` to the daemon. Only the bound address, localhost and configured names are served."""
    with run_app(http={"port": 0, "allowed_hosts": ["*.example.org", "box.lan"]}) as app:
        assert app.http is not None
        port = app.http.port
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "example.org.evil"):
            code, _, body = call(app, "GET", "/healthz", headers={"Host": host})
            assert code == 421 and "http.allowed_hosts" in body["error"], (host, body)
        code, _, _ = call(app, "POST", RETRAIN, b"{}", {**JSON, "Host": "evil.example"})
        assert code == 421
        for host in (f"127.0.0.1:{port}", "localhost", f"localhost:{port}", "api.example.org", "box.lan:80"):
            assert call(app, "GET", "/healthz", headers={"Host": host})[0] == 200, host


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example", "Content-Type": "text/plain"},
    {"Origin": "http://evil.example", "Content-Type": "application/json"},
    {"Origin": "null", "Content-Type": "application/json"},
    {"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"},
    {"Sec-Fetch-Site": "same-site", "Content-Type": "application/json"},
], ids=["form-post", "json-with-foreign-origin", "sandboxed", "fetch-cross-site", "fetch-same-site"])
def test_cross_site_posts_are_refused(run_app: Any, headers: dict[str, str]) -> None:
    """Kind: CSRF. A page the user visits POSTs to the daemon: the browser adds Origin/Sec-Fetch-Site."""
    with run_app() as app:
        code, _, body = call(app, "POST", RETRAIN, b"{}", headers)
        assert code == 403 and "cross-site" in body["error"], body
        code, _, _ = call(app, "POST", f"{MODEL}:classify", image_bytes("red", 1), headers)
        assert code == 403
        assert app.trainer.runs == 0 and not app.trainer._forced


def test_state_changes_take_json_from_the_same_origin(run_app: Any) -> None:
    with run_app() as app:
        assert app.http is not None
        code, _, body = call(app, "POST", RETRAIN, b"", {"Content-Type": "text/plain"})
        assert code == 415 and "application/json" in body["error"]
        code, _, body = call(app, "POST", RETRAIN, b"x=1", {"Content-Type": "application/x-www-form-urlencoded"})
        assert code == 415
        origin = f"http://127.0.0.1:{app.http.port}"
        code, _, body = call(app, "POST", RETRAIN, b"{}", {**JSON, "Origin": origin, "Sec-Fetch-Site": "same-origin"})
        assert (code, body) == (202, {"retrain": "requested"})


def test_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^http.token_file: serving on '0.0.0.0' reaches beyond"):
        make_config(tmp_path, http={"host": "0.0.0.0"})
    assert make_config(tmp_path, http={"host": "0.0.0.0", "allow_unauthenticated": True}).http.host == "0.0.0.0"
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match=r"^http.token_file: .* holds 3 bytes"), \
            App(make_config(tmp_path, http={"port": 0, "token_file": str(short)}), extra_plugins=(TinyBackbonePlugin(),)):
        pass


def listening_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("HTTP API listening on ")]


def test_start_logs_where_http_listens(run_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="daemon"), run_app(http={"port": 0}) as app:
        assert app.http is not None
        assert listening_lines(caplog) == [
            f"HTTP API listening on http://127.0.0.1:{app.http.port}/ (no token required: loopback only)"]


def test_the_token_is_required_where_configured(tmp_path: Path, run_app: Any,
                                                caplog: pytest.LogCaptureFixture) -> None:
    token = "3f1d5c0e9b7a4c2d8e6f0a1b2c3d4e5f"
    (tmp_path / "api.token").write_text(token + "\n")
    with caplog.at_level(logging.INFO, logger="daemon"), \
            run_app(http={"port": 0, "token_file": "api.token"}) as app:
        assert app.http is not None
        expected = (f"HTTP API listening on http://127.0.0.1:{app.http.port}/ (bearer token of http.token_file "
                    "required, except on /healthz, /readyz)")
        assert listening_lines(caplog) == [expected]
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": token},
                        {"Authorization": f"Basic {token}"}):
            code, reply_headers, body = call(app, "GET", MODEL, headers=headers)
            assert code == 401 and "http.token_file" in body["error"], headers
            assert reply_headers["www-authenticate"].startswith("Bearer")
        assert call(app, "GET", MODEL, headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert call(app, "GET", "/healthz")[0] == 200  # probes stay open (http.paths_without_token)
        assert call(app, "GET", "/metrics")[0] == 401
        code, _, _ = call(app, "POST", RETRAIN, b"{}", {**JSON, "Authorization": f"Bearer {token}"})
        assert code == 202


def test_hostile_json_is_a_400(served: App) -> None:
    """Kind: JSON that breaks the parser rather than the schema (deep nesting, integers past Python's limit)."""
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                     b'{"instances": [' + b"9" * 50_000 + b"]}", b'{"instances": [{"b64": "' + b"\xff" * 9 + b'"}]}'):
        code, headers, reply = call(served, "POST", f"{MODEL}:predict", body, JSON)
        assert code == 400 and headers["content-type"] == "application/json", reply
        assert "Traceback" not in reply["error"]


def _interim(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends within `timeout` s, up to the first pause (a whole interim `100 Continue`)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return b""


def _until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends before it closes the connection (or `timeout` s pass)."""
    chunks, deadline = [], time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and (chunk := _interim(sock, left)):
        chunks.append(chunk)
    return b"".join(chunks)


def test_expect_100_continue_is_answered_at_once(served: App) -> None:
    """Issue 11 row 10. Kind: a client that asks before sending a big body (curl does above 1 MiB) must hear
    `100 Continue` at once, or the final refusal (413) before it sends anything."""
    assert served.http is not None
    image = image_bytes("red", 3)
    head = (f"POST {MODEL}:classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {{}}\r\nExpect: 100-continue\r\n\r\n")
    with socket.create_connection(("127.0.0.1", served.http.port), timeout=5) as sock:
        sock.sendall(head.format(len(image)).encode())
        assert _interim(sock, 0.5).startswith(b"HTTP/1.1 100 Continue\r\n")
        sock.sendall(image)
        sock.settimeout(30)  # the answer itself may take a while on a busy machine; only the interim must be quick
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
            assert response.status == 200
            assert json.loads(response.read())["predictions"][0]["top_k"][0]["label"] == "red"
        finally:
            response.close()
    with socket.create_connection(("127.0.0.1", served.http.port), timeout=5) as sock:
        sock.sendall(head.format(17_000_000).encode())  # and no body: it must not be waited for
        reply = _until_closed(sock, 0.5)
        assert reply.startswith(b"HTTP/1.1 413 ") and b"http.max_body_bytes=4000000" in reply, reply


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_posts_a_3_mb_file_without_waiting(tmp_path: Path, served: App) -> None:
    """The case as reported: `curl --data-binary @3mb.jpg` (curl waits up to 1 s for `100 Continue`)."""
    assert served.http is not None
    url = f"http://127.0.0.1:{served.http.port}{MODEL}:classify"
    photo = image_bytes("red", 4, size=(1600, 1200))
    for size, expected in ((3_000_000, "200"), (6_000_000, "413")):
        big = tmp_path / f"{size}.jpg"
        big.write_bytes(photo + b"\0" * (size - len(photo)))  # a JPEG decoder stops at its end marker
        done = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                               "--data-binary", f"@{big}", "-H", "Content-Type: image/jpeg", url],
                              capture_output=True, text=True, timeout=30, check=True)
        code, seconds = done.stdout.split()
        assert code == expected and float(seconds) < 0.8, done.stdout


def test_slow_heads_and_bodies_are_cut_off(run_app: Any) -> None:
    """Kind: slowloris. A client that trickles its head or body holds nothing for long."""
    with run_app(http={"port": 0, "header_timeout_seconds": 0.5, "body_timeout_seconds": 0.5}) as app:
        assert app.http is not None
        with socket.create_connection(("127.0.0.1", app.http.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            started = time.monotonic()
            reply = _until_closed(sock, 5)
            assert reply.startswith(b"HTTP/1.1 408 ") and b"header_timeout_seconds" in reply
            assert time.monotonic() - started < 2
        with socket.create_connection(("127.0.0.1", app.http.port), timeout=5) as sock:
            sock.sendall(f"POST {MODEL}:retrain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Content-Length: 100\r\n\r\n{".encode())
            reply = _until_closed(sock, 5)
            assert reply.startswith(b"HTTP/1.1 408 ") and b"body_timeout_seconds" in reply, reply
        with socket.create_connection(("127.0.0.1", app.http.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Padding: " + b"a" * 70_000)
            reply = _interim(sock, 5)
            assert reply.startswith(b"HTTP/1.1 431 "), reply
        for head in (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 70_000 + b"\r\n\r\n",
                     b"GET /healthz?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                     b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n"):
            with socket.create_connection(("127.0.0.1", app.http.port), timeout=5) as sock:
                sock.sendall(head)  # KIND: a whole head over the limit, sent at once (it was served: 200)
                reply = _until_closed(sock, 5)
                assert reply.startswith(b"HTTP/1.1 431 ") and reply.count(b"HTTP/1.1") == 1, reply[:200]


def test_keep_alive_and_request_metrics(run_app: Any) -> None:
    with run_app() as app:
        assert app.http is not None
        connection = http.client.HTTPConnection("127.0.0.1", app.http.port, timeout=10)
        try:
            for _ in range(3):
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                assert response.status == 200 and json.loads(response.read())["status"] == "ok"
            first = connection.sock
            connection.request("GET", "/v1/models/nosuch")
            connection.getresponse().read()
            assert connection.sock is first  # one connection for all four
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        assert 'retraind_http_requests_total{code="200",method="GET",route="healthz"} 3.0' in text
        assert 'retraind_http_requests_total{code="404",method="GET",route="tfserving_status"} 1.0' in text
        assert 'retraind_http_request_duration_seconds_count{route="healthz"} 3.0' in text
        assert "retraind_http_inflight_requests 1.0" in text  # the scrape itself
