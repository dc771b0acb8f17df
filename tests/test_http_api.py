"""The model API over real HTTP on loopback: TF-Serving-shaped status and metadata, classify with raw bytes and
with b64 instances, retrain, and every refusal as a 4xx JSON error (never a traceback or an HTML page)."""

from __future__ import annotations

import base64
import http.client
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Mount, Route

from daemon.app import App
from daemon.hookspecs import hookimpl
from daemon.http.api import MAX_INSTANCES
from daemon.http.routes import routes
from daemon.retrain_policy import RetrainState
from tests.conftest import image_bytes, seed_classes, wait_for

MODEL = "/v1/models/retraind"
JSON = {"Content-Type": "application/json"}  # state-changing routes take JSON only


def call(app: App, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection: (status, lower-cased headers, decoded JSON body or None for an empty one)."""
    assert app.http is not None
    connection = http.client.HTTPConnection("127.0.0.1", app.http.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, json.loads(raw) if raw else None
    finally:
        connection.close()


def b64(data: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(data).decode()}


def assert_error(reply: tuple[int, dict[str, str], Any], status: int, words: str) -> None:
    code, headers, body = reply
    assert code == status, body
    assert headers["content-type"] == "application/json"
    assert set(body) == {"error"} and words in body["error"], body
    assert "Traceback" not in body["error"]


def test_before_the_first_model(run_app: Any) -> None:
    with run_app() as app:
        code, _, status = call(app, "GET", MODEL)
        assert code == 200
        assert status["model_version_status"][0]["state"] == "START"
        assert_error(call(app, "GET", f"{MODEL}/metadata"), 503, "no model")
        assert_error(call(app, "POST", f"{MODEL}:classify", image_bytes("red", 1)), 503, "no model")


def test_status_metadata_and_classify(served: App) -> None:
    app = served
    code, _, status = call(app, "GET", MODEL)
    assert code == 200 and status == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}

    code, _, meta = call(app, "GET", f"{MODEL}/metadata")
    assert code == 200
    assert meta["model_spec"] == {"name": "retraind", "signature_name": "", "version": "1"}
    assert meta["labels"] == ["blue", "red"] and meta["backbone"] == "tiny/seed7/v1"
    assert set(meta["accuracy"]) == {"train", "validation", "test"} and len(meta["manifest_sha256"]) == 64
    assert sum(meta["images"]["red"].values()) == 12

    code, _, raw = call(app, "POST", f"{MODEL}:classify", image_bytes("red", 5001),
                        {"Content-Type": "image/jpeg"})
    assert code == 200 and raw["model_version"] == 1
    (prediction,) = raw["predictions"]
    assert [t["label"] for t in prediction["top_k"]] == ["red", "blue"]
    assert prediction["top_k"][0]["score"] > prediction["top_k"][1]["score"]

    body = json.dumps({"instances": [b64(image_bytes("blue", 5002, "PNG")), b64(image_bytes("red", 5003))]})
    code, _, batch = call(app, "POST", f"{MODEL}:classify", body.encode(), {"Content-Type": "application/json"})
    assert code == 200
    assert [p["top_k"][0]["label"] for p in batch["predictions"]] == ["blue", "red"]

    # curl -d without a JSON content type still works: the body is recognised by its leading brace.
    code, _, sniffed = call(app, "POST", f"{MODEL}:classify", body.encode(),
                            {"Content-Type": "application/x-www-form-urlencoded"})
    assert code == 200 and sniffed["predictions"] == batch["predictions"]

    # TF Serving's versioned paths: the served version answers, another is 404.
    assert call(app, "GET", f"{MODEL}/versions/1/metadata")[2] == meta
    code, _, versioned = call(app, "POST", f"{MODEL}/versions/1:classify", image_bytes("red", 5001))
    assert code == 200 and versioned["predictions"] == raw["predictions"]
    assert_error(call(app, "GET", f"{MODEL}/versions/7"), 404, "version 7 is not kept (kept: 1)")

    code, headers, _ = call(app, "HEAD", "/healthz")
    assert code == 200 and int(headers["content-length"]) > 0

    # the server's own address, as a person types it into a browser, leads to the review page
    code, headers, _ = call(app, "GET", "/")
    assert (code, headers["location"]) == (301, "/ui/")


@pytest.mark.parametrize(("body", "headers", "status", "words"), [
    (b"", {}, 400, "empty body"),
    (b"this is not an image", {}, 422, "not a usable image"),
    (b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    (b'{"inputs": []}', {"Content-Type": "application/json"}, 400, "1 to"),
    (b'{"instances": []}', {"Content-Type": "application/json"}, 400, "1 to"),
    (b'{"instances": ["abc"]}', {"Content-Type": "application/json"}, 400, "instances[0] is not"),
    (b'{"instances": [{"b64": "***"}]}', {"Content-Type": "application/json"}, 400, "invalid base64"),
    (json.dumps({"instances": [b64(b"GIF89a")] * (MAX_INSTANCES + 1)}).encode(), {}, 400, "1 to"),
    (json.dumps({"instances": [b64(b"\x89PNG\r\n")]}).encode(), {}, 422, "not a usable image"),
    (b'{"instances": [{"b64": ""}]}', {"Content-Type": "application/json"}, 422, "not a usable image (empty)"),
], ids=["empty", "garbage", "bad-json", "no-instances", "zero-instances", "not-b64-object", "bad-b64",
        "too-many", "broken-png", "empty-b64"])
def test_bad_classify_requests(served: App, body: bytes, headers: dict[str, str], status: int, words: str) -> None:
    assert_error(call(served, "POST", f"{MODEL}:classify", body, headers), status, words)


def raw_request(app: App, head: bytes, body: bytes = b"") -> tuple[int, Any]:
    """Send bytes as they are (bad framing that http.client would refuse to produce); parse the reply."""
    assert app.http is not None
    with socket.create_connection(("127.0.0.1", app.http.port), timeout=10) as sock:
        sock.sendall(head + body)
        response = http.client.HTTPResponse(sock)
        try:
            response.begin()
            return response.status, json.loads(response.read())
        finally:
            response.close()


def test_routes_methods_and_framing(served: App) -> None:
    app = served
    assert_error(call(app, "GET", "/v1/models/inception"), 404, "no model named 'inception'")
    assert_error(call(app, "POST", "/v1/models/other:classify", b"x"), 404, "no model named")
    assert_error(call(app, "GET", "/v2/anything"), 404, "no such endpoint")
    reply = call(app, "GET", f"{MODEL}:classify")
    assert_error(reply, 405, "use POST")
    assert reply[1]["allow"] == "POST"
    assert_error(call(app, "POST", "/metrics", b"x"), 405, "use GET")
    assert_error(call(app, "DELETE", MODEL), 405, "not allowed")
    assert_error(call(app, "PUT", f"{MODEL}:retrain", b"x"), 405, "not allowed")
    assert_error(call(app, "BREW", MODEL), 400, "malformed HTTP request")

    assert_error(call(app, "POST", f"{MODEL}:classify", b"x" * 4_000_001), 413, "http.max_body_bytes=4000000")
    path = f"{MODEL}:classify".encode()
    status, body = raw_request(app, b"POST " + path + b" HTTP/1.0\r\n\r\n")  # no length: no body
    assert (status, "empty body" in body["error"]) == (400, True)
    status, body = raw_request(app, b"POST " + path + b" HTTP/1.0\r\nContent-Length: -5\r\n\r\n")
    assert (status, "malformed HTTP request" in body["error"]) == (400, True)
    chunked = b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, body = raw_request(app, chunked, b"5\r\nhello\r\n0\r\n\r\n")
    assert (status, "not a usable image" in body["error"]) == (422, True)  # chunked bodies are read
    status, body = raw_request(app, chunked, b"".join(b"f4240\r\n" + b"x" * 1_000_000 + b"\r\n" for _ in range(5)))
    assert (status, "http.max_body_bytes=4000000" in body["error"]) == (413, True)  # ...and counted
    status, body = raw_request(app, b"GET /a b HTTP/1.0\r\n\r\n")
    assert (status, "malformed HTTP request" in body["error"]) == (400, True)


class OnlyWhenAsked:
    """A retrain policy that trains only on request, so each run here is the API's doing."""

    @hookimpl(tryfirst=True)
    def retraind_should_retrain(self, state: RetrainState) -> bool:
        return state.forced


def test_retrain_request_runs_the_trainer_unless_nothing_changed(tmp_path: Path, run_app: Any) -> None:
    seed_classes(tmp_path, per_label=4)
    with run_app(extra=(OnlyWhenAsked(),)) as app:
        wait_for(lambda: len(app.store.catalog()) == 8 and app.pipeline.idle.is_set(), what="the images indexed")
        code, _, body = call(app, "POST", f"{MODEL}:retrain", b"{}", JSON)
        assert (code, body) == (202, {"retrain": "requested"})
        wait_for(lambda: app.serving.version, what="the first model")
        wait_for(lambda: app.trainer.runs == 1, what="the first run to finish")
        code, _, body = call(app, "POST", f"{MODEL}:retrain", b"{}", JSON)
        assert (code, body) == (200, {"retrain": "unchanged", "model_version": 1})  # the same set, the same head
        app.config.folder("classes").joinpath("blue", "extra.jpg").write_bytes(image_bytes("blue", seed=77))
        wait_for(lambda: "blue/extra.jpg" in app.store.catalog(), what="the new image in the catalog")
        assert app.trainer.runs == 1
        code, _, body = call(app, "POST", f"{MODEL}:retrain", b"{}", JSON)
        assert (code, body) == (202, {"retrain": "requested"})
        wait_for(lambda: app.trainer.runs == 2, what="a forced training run")


def test_openapi_documents_every_route(served: App) -> None:
    """/openapi.json is built from the route table: a route added to it (another module's group) is in it."""
    code, _, doc = call(served, "GET", "/openapi.json")
    assert code == 200 and doc["openapi"].startswith("3.")
    operations = {op["operationId"]: (path, method) for path, methods in doc["paths"].items()
                  for method, op in methods.items()}
    assert len(operations) == sum(len(m) for m in doc["paths"].values())  # ids are unique
    for route in routes():
        assert isinstance(route, (Route, Mount))
        assert any(op.startswith(route.name) for op in operations), route.name
    assert operations["tfserving_predict_by_version"] == ("/v1/models/{model}/versions/{version}:predict", "post")
    assert operations["tfserving_predict_by_label"] == ("/v1/models/{model}/labels/{label}:predict", "post")
    assert operations["kserve_infer_by_version"] == ("/v2/models/{model}/versions/{version}/infer", "post")
    retrain = doc["paths"]["/v1/models/{model}:retrain"]["post"]
    assert retrain["x-retraind-extension"] is True and "application/json" in retrain["requestBody"]["content"]
    assert "x-retraind-extension" not in doc["paths"]["/v1/models/{model}:predict"]["post"]
    assert doc["paths"]["/v1/models/{model}:classify"]["post"]["x-retraind-extension"] is True
