"""KServe v2 / Open Inference Protocol through Triton's own client (`tritonclient.http`): health, server and
model metadata, inference with a BYTES input over the binary tensor data extension, binary and JSON outputs,
the classification extension, versions; the same top-1 as `:classify`; wrong shapes get a 400 naming ours."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from daemon.app import App
from tests.conftest import image_bytes
from tests.test_http_api import MODEL, assert_error, call

tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a test dependency")


@pytest.fixture
def client(served: App) -> Any:
    assert served.http is not None
    triton = tritonclient.InferenceServerClient(f"127.0.0.1:{served.http.port}", connection_timeout=10,
                                                network_timeout=30)
    yield triton
    triton.close()


def images_input(files: list[bytes]) -> Any:
    tensor = tritonclient.InferInput("image_bytes", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object), binary_data=True)
    return tensor


def test_health_and_metadata(served: App, client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("retraind") and client.is_model_ready("retraind", "1")
    assert not client.is_model_ready("retraind", "7") and not client.is_model_ready("other")
    server = client.get_server_metadata()
    assert server["name"] == "retraind" and {"binary_tensor_data", "classification"} <= set(server["extensions"])
    model = client.get_model_metadata("retraind")
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}]
    assert client.get_model_metadata("retraind", "1")["versions"] == ["1"]
    with pytest.raises(tritonclient.InferenceServerException, match="version 7 is not kept"):
        client.get_model_metadata("retraind", "7")


def test_infer_gives_the_top_1_of_classify(served: App, client: Any) -> None:
    files = [image_bytes("red", 601), image_bytes("blue", 602, "PNG"), image_bytes("red", 603, "WEBP")]
    body = json.dumps({"instances": [{"b64": __import__("base64").b64encode(f).decode()} for f in files]})
    code, _, classified = call(served, "POST", f"{MODEL}:classify", body.encode(), {"Content-Type": "application/json"})
    assert code == 200
    top1 = [p["top_k"][0]["label"] for p in classified["predictions"]]
    assert top1 == ["red", "blue", "red"]

    binary = client.infer("retraind", [images_input(files)], request_id="r-1")  # all outputs, binary
    probabilities = binary.as_numpy("probabilities")
    assert probabilities.shape == (3, 2) and probabilities.dtype == np.float32
    assert [("blue", "red")[i] for i in probabilities.argmax(axis=1)] == top1
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    response = binary.get_response()
    assert response["id"] == "r-1" and response["model_version"] == "1"

    as_json = client.infer("retraind", [images_input(files)], model_version="1",
                           outputs=[tritonclient.InferRequestedOutput("probabilities", binary_data=False)])
    np.testing.assert_allclose(as_json.as_numpy("probabilities"), probabilities, atol=1e-6)

    for binary_data in (True, False):
        ranked = client.infer("retraind", [images_input(files)], outputs=[
            tritonclient.InferRequestedOutput("probabilities", binary_data=binary_data, class_count=2)])
        rows = ranked.as_numpy("probabilities")
        assert rows.shape == (3, 2)
        for row, p in zip(rows, probabilities):
            entries = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]
            assert [label for _, _, label in entries] == [("blue", "red")[i] for i in np.argsort(-p)]
            assert [int(index) for _, index, _ in entries] == np.argsort(-p).tolist()
            np.testing.assert_allclose([float(score) for score, _, _ in entries], np.sort(p)[::-1], atol=1e-5)


def _post_infer(app: App, header: dict[str, Any], binary: bytes = b"") -> tuple[int, dict[str, str], Any]:
    text = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(text))} if binary else {}
    return call(app, "POST", "/v2/models/retraind/infer", text + binary, headers)


@pytest.mark.parametrize(("header", "binary", "status", "words"), [
    ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}]}, b"",
     400, "inputs are named ['pixels']"),
    ({"inputs": [{"name": "image_bytes", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, b"", 400,
     "image_bytes is FP32"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                  "parameters": {"binary_data_size": 8}}]}, struct.pack("<I", 4) + b"abcd", 400,
     "does not hold the 1 elements"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": 8}}]}, struct.pack("<I", 9) + b"abcd", 400,
     "ends inside an element"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["not an image"]}]}, b"", 422,
     "not a usable image"),
    ({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
      "outputs": [{"name": "scores"}]}, b"", 400, "the only output is 'probabilities'"),
], ids=["named-input-that-does-not-exist", "wrong-datatype", "shape-mismatch", "truncated", "not-an-image",
        "unknown-output"])
def test_wrong_requests(served: App, header: dict[str, Any], binary: bytes, status: int, words: str) -> None:
    reply = _post_infer(served, header, binary)
    assert_error(reply, status, words)
    if status == 400 and "output" not in words and "ends inside" not in words:
        assert "binary_data=True" in reply[2]["error"]  # the accepted shape, named
