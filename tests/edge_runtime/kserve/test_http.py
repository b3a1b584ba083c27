"""KServe v2 over HTTP/REST: raw HTTP over the Unix socket and tritonclient.http over loopback TCP, against a real
server beside the gRPC one on the same repository; bad requests get their 4xx with the reason, alone."""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from structlog.testing import capture_logs

from edge_runtime import errors
from edge_runtime.config import AgentConfig, ServerSection
from edge_runtime.errors import ConfigError, EdgeRuntimeError
from edge_runtime.inference.keeping import Keeper
from edge_runtime.inference.types import InferRequest
from edge_runtime.kserve.http import HttpInferenceServer, check_http_addresses
from edge_runtime.kserve.http_app import HTTP_STATUS, Route, route
from edge_runtime.models.repository import ModelRepository
from edge_runtime.outbox import Outbox
from edgefleet.proto.edgefleet.v1 import results_pb2
from edgefleet.proto.inference import grpc_service_pb2 as pb
from tests.edge_runtime.kserve.conftest import Serve, Served, digits_inputs
from tests.edge_runtime.kserve.test_status import ERROR_CLASSES, FailingRepository
from tests.loopcheck import LoopThread
from tests.waiting import wait_for

PROBE = Path(__file__).with_name("triton_http_probe.py")
needs_tritonclient = pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("geventhttpclient") is None,
    reason='tritonclient.http is not installed (pip install "tritonclient>=2.73" "geventhttpclient>=2.3")',
)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: what `curl --unix-socket` does."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        doc = self.json()
        assert set(doc) == {"error"}, doc
        return str(doc["error"])


@dataclass
class HttpServed:
    grpc: Served
    http: HttpInferenceServer

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http.tcp_port}"

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
        conn = UnixHTTPConnection(self.http.unix_socket)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def infer(self, doc: dict[str, Any], model: str = "digits", **headers: str) -> Answer:
        return self.call("POST", f"/v2/models/{model}/infer", json.dumps(doc).encode(), headers)


ServeHttp = Callable[..., HttpServed]


@pytest.fixture
def serve_http(serve: Serve, short_dir: Path) -> Iterator[ServeHttp]:
    """serve_http("digits:1", server={...}) -> gRPC and HTTP servers on one repository and loop."""
    started: list[HttpServed] = []

    def start(*packages: str | Path, **sections: dict[str, Any]) -> HttpServed:
        server = {"http_unix_socket": str(short_dir / "http.sock"), "http_tcp_address": "127.0.0.1:0"}
        served = serve(*packages, server={**server, **sections.pop("server", {})}, **sections)
        http_server = served.loop.run(
            HttpInferenceServer.start(served.repo, served.config.server, "9.9.9-test", shm=served.server.shared_memory)
        )
        assert http_server is not None
        started.append(HttpServed(served, http_server))
        return started[-1]

    yield start
    for s in started:  # before `serve` stops the loop and checks it was never blocked
        s.grpc.loop.run(s.http.stop(1.0))
        assert not Path(s.http.unix_socket).exists()


def digits_doc(pixels: np.ndarray[Any, Any], **extra: Any) -> dict[str, Any]:
    tensor = {"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}
    return {"inputs": [tensor], **extra}


def binary_request(pixels: np.ndarray[Any, Any], outputs: list[dict[str, Any]] | None = None) -> tuple[bytes, int]:
    raw = np.ascontiguousarray(pixels, dtype=np.float32).tobytes()
    tensor = {
        "name": "pixels",
        "datatype": "FP32",
        "shape": list(pixels.shape),
        "parameters": {"binary_data_size": len(raw)},
    }
    head = json.dumps({"inputs": [tensor], **({"outputs": outputs} if outputs else {})}).encode()
    return head + raw, len(head)


def expected(served: HttpServed, pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return served.grpc.repo.infer(InferRequest("digits", {"pixels": pixels})).outputs["probabilities"]


# --- routes -------------------------------------------------------------------------------------------------


def test_the_route_table_names_model_version_and_handler() -> None:
    assert route("/v2") == Route("server_metadata", ("GET",))
    assert route("/v2/models/stats") == Route("stats", ("GET",))
    assert route("/v2/models/digits/versions/2/infer") == Route("infer", ("POST",), "digits", "2")
    assert route("/v2/models/digits/ready") == Route("model_ready", ("GET",), "digits")
    assert route("/v2/repository/models/digits/load") == Route("load", ("POST",), "digits")
    assert route("/v2/systemsharedmemory/status") == Route("shm_status", ("GET",))
    assert route("/v2/systemsharedmemory/region/in/register") == Route("shm_register", ("POST",), region="in")
    cuda = Route("shm_unregister", ("POST",), region="g", cuda=True)
    assert route("/v2/cudasharedmemory/region/g/unregister") == cuda
    assert route("/v2/cudasharedmemory/unregister") == Route("shm_unregister", ("POST",), cuda=True)
    for path in ("/", "/v2/", "/v2/models", "/v2/models/", "/v2/models/digits/versions", "/v2/models/d/x", "/v1"):
        assert route(path) is None, path
    for path in (
        "/v2/systemsharedmemory",
        "/v2/systemsharedmemory/region/status",
        "/v2/systemsharedmemory/region//status",
        "/v2/systemsharedmemory/x/in/status",
        "/v2/systemsharedmemory/region/in/map",
        "/v2/othersharedmemory/status",
    ):
        assert route(path) is None, path


def test_health_metadata_config_and_statistics(serve_http: ServeHttp) -> None:
    s = serve_http("digits:1")
    assert s.call("GET", "/v2/health/live").status == 200
    assert s.call("GET", "/v2/health/ready").status == 200
    assert s.call("GET", "/v2/models/digits/ready").status == 200
    assert s.call("GET", "/v2/models/digits/versions/1/ready").status == 200
    assert s.call("GET", "/v2/models/digits/versions/7/ready").status == 400
    assert s.call("GET", "/v2/models/nope/ready").status == 400
    server = s.call("GET", "/v2").json()
    assert server["name"] == "edgefleet-edge-agent" and server["version"] == "9.9.9-test"
    meta = s.call("GET", "/v2/models/digits").json()
    assert meta == s.call("GET", "/v2/models/digits/versions/1").json()
    assert (meta["name"], meta["versions"], meta["platform"]) == ("digits", ["1"], "onnxruntime_onnx")
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    config = s.call("GET", "/v2/models/digits/config").json()
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [64]}]
    assert config["max_batch_size"] > 1 and config["dynamic_batching"]["preferred_batch_size"]
    assert s.infer(digits_doc(digits_inputs(3))).status == 200
    (stats,) = s.call("GET", "/v2/models/digits/stats").json()["model_stats"]
    assert (stats["name"], stats["version"], stats["inference_count"]) == ("digits", "1", 3)
    assert stats["inference_stats"]["success"]["count"] == 1 and stats["batch_stats"]
    assert s.call("GET", "/v2/models/stats").json()["model_stats"][0]["inference_count"] == 3
    index = s.call("POST", "/v2/repository/index", b'{"ready": true}').json()
    assert index == [{"name": "digits", "version": "1", "state": "READY", "reason": ""}]
    assert s.call("POST", "/v2/repository/index").status == 200


def test_unknown_routes_wrong_methods_and_refused_extensions(serve_http: ServeHttp) -> None:
    s = serve_http("digits:1")
    missing = s.call("GET", "/v2/models/digits/explain")
    assert missing.status == 404 and "no such route" in missing.error
    wrong = s.call("GET", "/v2/models/digits/infer")
    assert wrong.status == 405 and wrong.headers["allow"] == "POST" and "POST" in wrong.error
    assert s.call("GET", "/v2/models/nope").status == 404
    assert "unknown model 'nope'" in s.call("GET", "/v2/models/nope/config").error
    bad_version = s.call("GET", "/v2/models/digits/versions/x1")
    assert bad_version.status == 400 and "not a positive integer" in bad_version.error
    for verb in ("load", "unload"):
        refused = s.call("POST", f"/v2/repository/models/digits/{verb}")
        assert refused.status == 501 and "fleetctl models assign" in refused.error
    wrong_shm = s.call("POST", "/v2/systemsharedmemory/region/in/status")
    assert wrong_shm.status == 405 and wrong_shm.headers["allow"] == "GET"
    assert s.call("GET", "/v2/systemsharedmemory/unregister").status == 405
    assert s.call("GET", "/v2/systemsharedmemory/region/in/map").status == 404


# --- inference ----------------------------------------------------------------------------------------------


def test_json_inference_flat_and_nested_with_id_parameters_and_output_selection(serve_http: ServeHttp) -> None:
    s = serve_http("digits:1")
    pixels = digits_inputs(4, offset=10)
    want = expected(s, pixels)
    flat = s.infer(digits_doc(pixels, id="req-7", parameters={"priority": 1, "timeout": 5_000_000}))
    assert flat.status == 200 and flat.headers["content-type"] == "application/json"
    doc = flat.json()
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("digits", "1", "req-7")
    (out,) = doc["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("probabilities", "FP32", [4, 10])
    np.testing.assert_array_equal(np.array(out["data"], dtype=np.float32).reshape(4, 10), want)
    nested = digits_doc(pixels, outputs=[{"name": "probabilities"}])
    nested["inputs"][0]["data"] = pixels.tolist()
    (out,) = s.infer(nested).json()["outputs"]
    np.testing.assert_array_equal(np.array(out["data"], dtype=np.float32).reshape(4, 10), want)
    unknown = s.infer(digits_doc(pixels, outputs=[{"name": "logits"}]))
    assert unknown.status == 400 and "'logits'" in unknown.error


def test_binary_inputs_and_outputs(serve_http: ServeHttp) -> None:
    s = serve_http("digits:1")
    pixels = digits_inputs(5, offset=30)
    body, length = binary_request(pixels, [{"name": "probabilities", "parameters": {"binary_data": True}}])
    answer = s.call("POST", "/v2/models/digits/infer", body, {"Inference-Header-Content-Length": str(length)})
    assert answer.status == 200 and answer.headers["content-type"] == "application/octet-stream"
    head = int(answer.headers["inference-header-content-length"])
    (out,) = json.loads(answer.body[:head])["outputs"]
    assert out["parameters"] == {"binary_data_size": 5 * 10 * 4} and "data" not in out
    got = np.frombuffer(answer.body[head:], dtype=np.float32).reshape(5, 10)
    np.testing.assert_array_equal(got, expected(s, pixels))
    # binary in, JSON out (binary_data_output false by default)
    body, length = binary_request(pixels)
    plain = s.call("POST", "/v2/models/digits/infer", body, {"Inference-Header-Content-Length": str(length)})
    (out,) = plain.json()["outputs"]
    np.testing.assert_array_equal(np.array(out["data"], dtype=np.float32).reshape(5, 10), got)


def test_a_kept_result_is_in_the_outbox_when_the_answer_comes(
    make_config: Callable[..., AgentConfig], model_packages: dict[str, Path], tmp_path: Path, short_dir: Path
) -> None:
    outbox = Outbox.open(tmp_path / "outbox.db", max_bytes=1 << 24, max_age_s=0)
    config = make_config(upload={"sample_rate": 0.0}, server={"http_unix_socket": str(short_dir / "k.sock")})
    repo = ModelRepository(config, keeper=Keeper(outbox, 0.0))
    repo.install(model_packages["digits:1"])
    loop = LoopThread()
    server = loop.run(HttpInferenceServer.start(repo, config.server, "t"))
    assert server is not None
    try:
        answer = HttpServed(None, server).infer(  # type: ignore[arg-type]
            digits_doc(digits_inputs(1), id="kept-1", parameters={"edgefleet.keep": True})
        )
        assert answer.status == 200 and answer.json()["parameters"] == {"edgefleet.kept": True}
        records = [r for r in outbox.read_batch(100, 1 << 24).records if r.kind != results_pb2.RECORD_KIND_EVENT]
        assert [(r.model, r.request_id) for r in records] == [("digits", "kept-1")]  # committed before the answer
    finally:
        loop.run(server.stop(1.0))
        loop.close()
        repo.close()
        outbox.close()


def test_a_client_that_hangs_up_withdraws_its_queued_request(serve_http: ServeHttp) -> None:
    # A long queue delay keeps the lone request waiting for batch-mates; its client leaves meanwhile.
    s = serve_http("digits:1", inference={"adaptive": False, "max_batch_size": 64, "max_queue_delay_ms": 2000.0})
    batcher = s.grpc.repo.model("digits").batcher
    body = json.dumps(digits_doc(digits_inputs(1))).encode()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(s.http.unix_socket)
    head = f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    client.sendall(head.encode() + body)
    wait_for(lambda: batcher.pending() == 1, 10, "the request to queue")
    client.close()
    wait_for(lambda: batcher.pending() == 0 and batcher.running_since() is None, 10, "the queue to empty")
    stats = s.grpc.stats("digits")
    assert (stats.inference_count, stats.execution_count) == (0, 0)  # withdrawn, never run
    assert s.infer(digits_doc(digits_inputs(1))).status == 200


def test_gzip_and_deflate_requests_and_a_gzip_response(serve_http: ServeHttp) -> None:
    s = serve_http("digits:1")
    pixels = digits_inputs(8)
    raw = json.dumps(digits_doc(pixels)).encode()
    for coding, packed in (("gzip", gzip.compress(raw)), ("deflate", zlib.compress(raw))):
        answer = s.call(
            "POST", "/v2/models/digits/infer", packed, {"Content-Encoding": coding, "Accept-Encoding": "gzip"}
        )
        assert answer.status == 200 and answer.headers["content-encoding"] == "gzip"
        (out,) = json.loads(gzip.decompress(answer.body))["outputs"]
        np.testing.assert_array_equal(np.array(out["data"], dtype=np.float32).reshape(8, 10), expected(s, pixels))


def test_tcp_answers_do_not_wait_for_the_clients_delayed_ack(serve_http: ServeHttp) -> None:
    # Without TCP_NODELAY on the accepted sockets, a response's body waited ~40 ms behind its headers: every
    # answer, so even the fastest of 15 took 40 ms or more. The fastest, not the median: a loaded CI box can
    # stretch many of them past any fixed bound (one median was 32 ms with the fix in place).
    s = serve_http("digits:1")
    conn = http.client.HTTPConnection("127.0.0.1", s.http.tcp_port, timeout=30)
    took = []
    try:
        for _ in range(15):
            began = time.monotonic()
            conn.request("GET", "/v2")
            response = conn.getresponse()
            assert response.status == 200 and response.read()
            took.append(time.monotonic() - began)
    finally:
        conn.close()
    assert min(took) < 0.03, took


# --- bad requests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "status", "reason"),
    [
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 63}]}, 400, "63 values"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 32], "data": [0.0] * 32}]}, 400, "'pixels'"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": ["x"] * 64}]}, 400, "numbers"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1e300] * 64}]}, 400, "range"),
        ({"inputs": [{"name": "pixels", "datatype": "FP16", "shape": [1, 64], "data": [0.0] * 64}]}, 400, "FP16"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, True]}]}, 400, "'shape'"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64]}]}, 400, "neither 'data'"),
        ({"inputs": []}, 400, "non-empty list"),
        ({"inputs": [], "extra": 1}, 400, "unknown key 'extra'"),
        ({"inputs": [{"name": "p", "datatype": "STR", "shape": [1], "data": [1]}]}, 400, "datatype 'STR'"),
        ({"id": 5, "inputs": []}, 400, "'id' must be a string"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64], "data": []}]}, 400, "negative"),
        ({"parameters": {"priority": -1}, "inputs": []}, 400, "non-empty list"),
    ],
)
def test_bad_json_requests_get_400_with_the_reason(
    serve_http: ServeHttp, doc: dict[str, Any], status: int, reason: str
) -> None:
    answer = serve_http("digits:1").infer(doc)
    assert answer.status == status and reason in answer.error, answer.body


def test_malformed_bodies_and_headers(serve_http: ServeHttp) -> None:
    s = serve_http("digits:1")
    bad = s.call("POST", "/v2/models/digits/infer", b'{"inputs": [', {})
    assert bad.status == 400 and "not valid JSON" in bad.error
    assert s.call("POST", "/v2/models/digits/infer", b"\xff\xfe", {}).status == 400
    kind = s.call("POST", "/v2/models/digits/infer", b"{}", {"Content-Type": "text/plain"})
    assert kind.status == 400 and "Content-Type" in kind.error
    body, length = binary_request(digits_inputs(1))
    for header in ("abc", "-1", str(len(body) + 1), "0"):
        answer = s.call("POST", "/v2/models/digits/infer", body, {"Inference-Header-Content-Length": header})
        assert answer.status == 400 and "Inference-Header-Content-Length" in answer.error, header
    short = s.call("POST", "/v2/models/digits/infer", body[:-4], {"Inference-Header-Content-Length": str(length)})
    assert short.status == 400 and "runs past the end" in short.error
    extra = s.call("POST", "/v2/models/digits/infer", body + b"1234", {"Inference-Header-Content-Length": str(length)})
    assert extra.status == 400 and "after the inputs" in extra.error
    headless = s.call("POST", "/v2/models/digits/infer", body, {})
    assert headless.status == 400  # without the header the binary part is not JSON
    binary_doc = json.loads(body[:length])
    no_header = s.call("POST", "/v2/models/digits/infer", json.dumps(binary_doc).encode(), {})
    assert no_header.status == 400 and "no Inference-Header-Content-Length" in no_header.error
    coding = s.call("POST", "/v2/models/digits/infer", b"{}", {"Content-Encoding": "br"})
    assert coding.status == 400 and "Content-Encoding" in coding.error
    broken = s.call("POST", "/v2/models/digits/infer", gzip.compress(b"{}")[:-3], {"Content-Encoding": "gzip"})
    assert broken.status == 400 and "gzip" in broken.error
    assert s.infer(digits_doc(digits_inputs(1)), model="nope").status == 404


def test_an_int8_value_out_of_range_is_refused(serve_http: ServeHttp, int_package: Path) -> None:
    s = serve_http(int_package)

    def doc(a: list[int], b: list[int]) -> dict[str, Any]:
        return {
            "inputs": [
                {"name": "a", "datatype": "INT8", "shape": [1, 4], "data": a},
                {"name": "b", "datatype": "UINT16", "shape": [1, 4], "data": b},
            ]
        }

    good = s.infer(doc([1, -2, 127, -128], [1, 2, 3, 65535]), model="mix")
    sums = {o["name"]: o["data"] for o in good.json()["outputs"]}["sum"]
    assert sums == [2, 0, 130, 65407]
    for a, b, reason in (
        ([1, 2, 300, 4], [1, 2, 3, 4], "value 300"),
        ([1, 2, 3, 4], [1, 2, 3, -1], "-1"),
        ([1, 2, 3, 4], [1, 2, 3, 2**70], "does not fit UINT16"),
        ([1, 2, 3.5, 4], [1, 2, 3, 4], "integers"),
        ([1, 2, True, 4], [1, 2, 3, 4], "integers"),
    ):
        answer = s.infer(doc(a, b), model="mix")
        assert answer.status == 400 and reason in answer.error, answer.body


def test_a_too_large_body_is_refused_before_it_is_read(serve_http: ServeHttp) -> None:
    s = serve_http("digits:1", server={"max_request_bytes": 4096})
    conn = UnixHTTPConnection(s.http.unix_socket)
    try:  # headers only: the server answers 413 without waiting for the 10 MiB it was promised
        conn.putrequest("POST", "/v2/models/digits/infer")
        conn.putheader("Content-Length", str(10 << 20))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413 and "past the limit" in json.loads(response.read())["error"]
    finally:
        conn.close()


def test_a_chunked_body_is_refused_once_it_passes_the_limit(serve_http: ServeHttp) -> None:
    s = serve_http("digits:1", server={"max_request_bytes": 4096})
    limit = 4096 + (1 << 20)
    chunks = iter([b"{" + b" " * 65535] * (limit // 65536 + 2))  # no Content-Length to refuse up front
    conn = UnixHTTPConnection(s.http.unix_socket)
    try:
        # The server may answer and close before the last chunks go: its answer is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.request("POST", "/v2/models/digits/infer", body=chunks, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and "past the limit" in json.loads(response.read())["error"]
    finally:
        conn.close()
    assert s.infer(digits_doc(digits_inputs(1))).status == 200


def test_a_gzip_bomb_is_capped(serve_http: ServeHttp) -> None:
    s = serve_http("digits:1", server={"max_request_bytes": 4096})
    bomb = gzip.compress(b"0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < 200_000
    answer = s.call("POST", "/v2/models/digits/infer", bomb, {"Content-Encoding": "gzip"})
    assert answer.status == 413 and "inflates past the limit" in answer.error
    assert s.infer(digits_doc(digits_inputs(1))).status == 200  # and the server goes on serving


def test_a_bad_request_fails_alone(serve_http: ServeHttp) -> None:
    s = serve_http("digits:1")
    pixels = digits_inputs(2)
    bad = digits_doc(pixels)
    bad["inputs"][0]["shape"] = [2, 63]

    def one(i: int) -> Answer:
        return s.infer(bad if i % 2 else digits_doc(pixels))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(16)))
    want = expected(s, pixels)
    for i, answer in enumerate(answers):
        if i % 2:
            assert answer.status == 400
        else:
            (out,) = answer.json()["outputs"]
            np.testing.assert_array_equal(np.array(out["data"], dtype=np.float32).reshape(2, 10), want)


# --- shared memory ------------------------------------------------------------------------------------------

Segment = Callable[[int], shared_memory.SharedMemory]


@pytest.fixture
def segment() -> Iterator[Segment]:
    """segment(size) -> a new POSIX shm segment (a file in /dev/shm), unlinked at teardown."""
    made: list[shared_memory.SharedMemory] = []

    def make(size: int) -> shared_memory.SharedMemory:
        made.append(shared_memory.SharedMemory(f"edgefleet-http-{uuid.uuid4().hex[:12]}", create=True, size=size))
        return made[-1]

    yield make
    for seg in made:
        seg.close()
        seg.unlink()


def key_of(seg: shared_memory.SharedMemory) -> str:
    return "/" + seg.name.lstrip("/")


def register(s: HttpServed, name: str, key: str, byte_size: int, offset: int = 0) -> Answer:
    doc = {"key": key, "offset": offset, "byte_size": byte_size}
    return s.call("POST", f"/v2/systemsharedmemory/region/{name}/register", json.dumps(doc).encode())


def shm_params(region: str, byte_size: int, offset: int = 0) -> dict[str, Any]:
    return {"shared_memory_region": region, "shared_memory_byte_size": byte_size, "shared_memory_offset": offset}


def shm_doc(
    rows: int, inputs: dict[str, Any] | None = None, outputs: dict[str, Any] | None = None, **tensor: Any
) -> dict[str, Any]:
    """A digits request with its input's and output's parameters as given (shared-memory references)."""
    pixels = {"name": "pixels", "datatype": "FP32", "shape": [rows, 64], "parameters": inputs or {}, **tensor}
    doc: dict[str, Any] = {"inputs": [pixels]}
    if outputs is not None:
        doc["outputs"] = [{"name": "probabilities", "parameters": outputs}]
    return doc


def test_shared_memory_register_infer_status_and_unregister(serve_http: ServeHttp, segment: Segment) -> None:
    s = serve_http("digits:1")
    pixels = digits_inputs(4, offset=40)
    out_bytes = 4 * 10 * 4
    seg_in, seg_out = segment(4096 + pixels.nbytes), segment(64 + out_bytes)
    seg_in.buf[4096 : 4096 + pixels.nbytes] = pixels.tobytes()
    assert register(s, "in", key_of(seg_in), 4096 + pixels.nbytes).status == 200
    assert register(s, "out", key_of(seg_out), out_bytes, offset=64).status == 200
    status = s.call("GET", "/v2/systemsharedmemory/status")
    assert status.status == 200 and status.json() == [
        {"name": "in", "key": key_of(seg_in), "offset": 0, "byte_size": 4096 + pixels.nbytes},
        {"name": "out", "key": key_of(seg_out), "offset": 64, "byte_size": out_bytes},
    ]
    assert s.call("GET", "/v2/systemsharedmemory/region/out/status").json() == status.json()[1:]
    assert "shared_memory" in s.call("GET", "/v2").json()["extensions"]

    answer = s.infer(shm_doc(4, shm_params("in", pixels.nbytes, 4096), shm_params("out", out_bytes)) | {"id": "shm-1"})
    assert answer.status == 200 and answer.headers["content-type"] == "application/json", answer.body
    doc = answer.json()
    # As Triton: an output in shared memory is named, typed and shaped, its bytes are in the region only.
    assert doc["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [4, 10]}]
    assert doc["id"] == "shm-1"
    got = np.frombuffer(bytes(seg_out.buf[64 : 64 + out_bytes]), np.float32).reshape(4, 10)
    body, length = binary_request(pixels, [{"name": "probabilities", "parameters": {"binary_data": True}}])
    binary = s.call("POST", "/v2/models/digits/infer", body, {"Inference-Header-Content-Length": str(length)})
    head = int(binary.headers["inference-header-content-length"])
    np.testing.assert_array_equal(got, np.frombuffer(binary.body[head:], np.float32).reshape(4, 10))
    np.testing.assert_array_equal(got, expected(s, pixels))
    # Input in shared memory, output as binary data in the body.
    mixed = s.infer(shm_doc(4, shm_params("in", pixels.nbytes, 4096), {"binary_data": True}))
    mixed_head = int(mixed.headers["inference-header-content-length"])
    np.testing.assert_array_equal(np.frombuffer(mixed.body[mixed_head:], np.float32).reshape(4, 10), got)

    assert s.call("POST", "/v2/systemsharedmemory/region/in/unregister").status == 200
    assert [r["name"] for r in s.call("GET", "/v2/systemsharedmemory/status").json()] == ["out"]
    gone = s.infer(shm_doc(4, shm_params("in", pixels.nbytes, 4096)))
    assert gone.status == 400 and "'in'" in gone.error
    assert s.call("POST", "/v2/systemsharedmemory/region/nope/unregister").status == 200  # as Triton: no error
    assert s.call("POST", "/v2/systemsharedmemory/unregister", b"{}").status == 200
    assert s.call("GET", "/v2/systemsharedmemory/status").json() == []
    assert s.grpc.server.shared_memory is not None and s.grpc.server.shared_memory.mapped() == (0, 0)


def test_a_region_registered_over_one_protocol_serves_the_other(serve_http: ServeHttp, segment: Segment) -> None:
    s = serve_http("digits:1")
    pixels = digits_inputs(3, offset=50)
    want = expected(s, pixels)
    by_grpc, by_http = segment(pixels.nbytes), segment(pixels.nbytes)
    by_grpc.buf[: pixels.nbytes] = pixels.tobytes()
    by_http.buf[: pixels.nbytes] = pixels.tobytes()
    stub = s.grpc.stub()
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="g", key=key_of(by_grpc), byte_size=pixels.nbytes)
    )
    assert [r["name"] for r in s.call("GET", "/v2/systemsharedmemory/status").json()] == ["g"]
    answer = s.infer(shm_doc(3, shm_params("g", pixels.nbytes)))
    assert answer.status == 200, answer.body
    (out,) = answer.json()["outputs"]
    np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(3, 10), want)
    taken = register(s, "g", key_of(by_http), pixels.nbytes)
    assert taken.status == 409 and "'g' already in manager" in taken.error

    assert register(s, "h", key_of(by_http), pixels.nbytes).status == 200
    assert set(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions) == {"g", "h"}
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[3, 64])
    tensor.parameters["shared_memory_region"].string_param = "h"
    tensor.parameters["shared_memory_byte_size"].int64_param = pixels.nbytes
    reply = stub.ModelInfer(request)
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(3, 10), want)

    assert s.call("POST", "/v2/systemsharedmemory/unregister").status == 200
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions


def test_bad_shared_memory_references_get_400_with_the_reason_and_change_nothing(
    serve_http: ServeHttp, segment: Segment
) -> None:
    s = serve_http("digits:1")
    pixels = digits_inputs(2, offset=60)
    n, out_bytes = pixels.nbytes, 2 * 10 * 4
    seg_in, seg_out = segment(n), segment(out_bytes)
    seg_in.buf[:n] = pixels.tobytes()
    seg_out.buf[:out_bytes] = b"\xab" * out_bytes
    assert register(s, "in", key_of(seg_in), n).status == 200
    assert register(s, "out", key_of(seg_out), out_bytes).status == 200
    status = s.call("GET", "/v2/systemsharedmemory/status").json()
    good_out = shm_params("out", out_bytes)
    for doc, reason in (
        (shm_doc(2, shm_params("nope", n), good_out), "Unable to find shared memory region: 'nope'"),
        (shm_doc(2, shm_params("in", n, n), good_out), "Invalid offset for shared memory region: 'in'"),
        (shm_doc(2, shm_params("in", n, 4), good_out), "Invalid offset + byte size"),
        (shm_doc(2, shm_params("in", n - 4), good_out), f"need {n}"),
        (shm_doc(2, {"shared_memory_region": "in"}, good_out), "must be specified along with"),
        (shm_doc(2, {"shared_memory_byte_size": n}, good_out), "can not be specified without"),
        (shm_doc(2, {**shm_params("in", n), "shared_memory_byte_size": float(n)}, good_out), "int64_param"),
        (shm_doc(2, {**shm_params("in", n), "shared_memory_offset": True}, good_out), "int64_param"),
        (shm_doc(2, shm_params("in", n), good_out, data=[0.0] * 128), "also sets 'data'"),
        (shm_doc(2, {**shm_params("in", n), "binary_data_size": n}, good_out), "also sets 'binary_data_size'"),
        (shm_doc(2, shm_params("in", n), shm_params("nope", out_bytes)), "'nope'"),
        (shm_doc(2, shm_params("in", n), shm_params("out", out_bytes, 8)), "Invalid offset + byte size"),
        (shm_doc(2, shm_params("in", n), {**good_out, "binary_data": True}), "can't set both"),
        (shm_doc(2, shm_params("in", n), {"shared_memory_offset": 0}), "can not be specified without"),
    ):
        answer = s.infer(doc)
        assert answer.status == 400 and reason in answer.error, (reason, answer.body)
    for path, body, code, reason in (
        ("/v2/systemsharedmemory/register", b"{}", 400, "'region name' is necessary"),
        ("/v2/systemsharedmemory/region/x/register", b'{"byte_size": 8}', 400, "no 'key' field"),
        ("/v2/systemsharedmemory/region/x/register", b'{"key": "/k"}', 400, "no 'byte_size' field"),
        ("/v2/systemsharedmemory/region/x/register", b'{"key": 5, "byte_size": 8}', 400, "'key'"),
        ("/v2/systemsharedmemory/region/x/register", b'{"key": "/k", "byte_size": "8"}', 400, "non-negative"),
        ("/v2/systemsharedmemory/region/x/register", b'{"key": "/k", "byte_size": 8, "offset": -1}', 400, "offset"),
        ("/v2/systemsharedmemory/region/x/register", b'{"key": "/k", "byte_size": 8, "flags": 1}', 400, "'flags'"),
        ("/v2/systemsharedmemory/region/x/register", b'{"key": "/k", ', 400, "not valid JSON"),
        ("/v2/systemsharedmemory/region/x/register", b"[]", 400, "JSON object"),
        (
            "/v2/systemsharedmemory/region/x/register",
            json.dumps({"key": "/../etc/passwd", "byte_size": 8}).encode(),
            400,
            "not a POSIX shm name",
        ),
        (
            "/v2/systemsharedmemory/region/x/register",
            json.dumps({"key": f"/edgefleet-none-{uuid.uuid4().hex}", "byte_size": 8}).encode(),
            400,
            "no such segment",
        ),
        (
            "/v2/systemsharedmemory/region/x/register",
            json.dumps({"key": key_of(seg_in), "byte_size": n + 1}).encode(),
            400,
            "past the end of segment",
        ),
        (
            "/v2/systemsharedmemory/region/in/register",
            json.dumps({"key": key_of(seg_in), "byte_size": n}).encode(),
            409,
            "'in' already in manager",
        ),
        ("/v2/systemsharedmemory/region/in/unregister", b"[1]", 400, "takes no body"),
        ("/v2/cudasharedmemory/region/g/register", b'{"raw_handle": "x", "device_id": 0, "byte_size": 8}', 400, "b64"),
        (
            "/v2/cudasharedmemory/region/g/register",
            json.dumps({"raw_handle": {"b64": "!!"}, "device_id": 0, "byte_size": 8}).encode(),
            400,
            "valid base64",
        ),
        (
            "/v2/cudasharedmemory/region/g/register",
            json.dumps(
                {"raw_handle": {"b64": base64.b64encode(b"x" * 10).decode()}, "device_id": 0, "byte_size": 8}
            ).encode(),
            400,
            "raw_handle is 10 bytes",
        ),
    ):
        answer = s.call("POST", path, body)
        assert answer.status == code and reason in answer.error, (path, body, answer.body)
    unknown = s.call("GET", "/v2/systemsharedmemory/region/nope/status")
    assert unknown.status == 404 and "Unable to find system shared memory region: 'nope'" in unknown.error
    assert s.call("GET", "/v2/cudasharedmemory/status").json() == []
    assert s.call("GET", "/v2/cudasharedmemory/region/in/status").status == 400  # a system region, not CUDA

    # Nothing changed: the same regions, the output region untouched, no request ran.
    assert s.call("GET", "/v2/systemsharedmemory/status").json() == status
    assert bytes(seg_out.buf[:out_bytes]) == b"\xab" * out_bytes
    assert s.grpc.stats("digits").inference_count == 0
    # An output region too small for the answer is found once the model has run, as in Triton: refused too.
    small = s.infer(shm_doc(2, shm_params("in", n), shm_params("out", 8)))
    assert small.status == 400 and f"should be at least {out_bytes} bytes" in small.error
    assert bytes(seg_out.buf[:out_bytes]) == b"\xab" * out_bytes
    good = s.infer(shm_doc(2, shm_params("in", n), good_out))
    assert good.status == 200, good.body
    got = np.frombuffer(bytes(seg_out.buf[:out_bytes]), np.float32).reshape(2, 10)
    np.testing.assert_array_equal(got, expected(s, pixels))


def test_a_bad_shared_memory_request_fails_alone(serve_http: ServeHttp, segment: Segment) -> None:
    s = serve_http("digits:1")
    pixels = digits_inputs(2, offset=70)
    seg = segment(pixels.nbytes)
    seg.buf[: pixels.nbytes] = pixels.tobytes()
    assert register(s, "in", key_of(seg), pixels.nbytes).status == 200
    good, bad = shm_doc(2, shm_params("in", pixels.nbytes)), shm_doc(2, shm_params("in", pixels.nbytes - 8))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: s.infer(bad if i % 2 else good), range(16)))
    want = expected(s, pixels)
    for i, answer in enumerate(answers):
        if i % 2:
            assert answer.status == 400 and "need" in answer.error
        else:
            (out,) = answer.json()["outputs"]
            np.testing.assert_array_equal(np.array(out["data"], dtype=np.float32).reshape(2, 10), want)


# --- tritonclient.http --------------------------------------------------------------------------------------


@needs_tritonclient
def test_tritonclient_http_works_unchanged_and_answers_as_grpc(serve_http: ServeHttp, tmp_path: Path) -> None:
    s = serve_http("digits:1")
    pixels = digits_inputs(6, offset=20)
    np.save(tmp_path / "in.npy", pixels)
    done = subprocess.run(
        [sys.executable, str(PROBE), "client", s.url, str(tmp_path / "in.npy"), str(tmp_path / "out")],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = json.loads(done.stdout)
    assert report["live"] and report["ready"] and report["model_ready"] and report["model_ready_v1"]
    assert report["unknown_ready"] is False
    assert report["server_metadata"]["name"] == "edgefleet-edge-agent"
    assert report["metadata"]["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert report["config"]["name"] == "digits"
    grpc_answer = s.grpc.client().infer("digits", {"pixels": pixels}).outputs["probabilities"]
    for name in ("False", "True", "all", "gzip"):
        np.testing.assert_array_equal(np.load(tmp_path / f"out-{name}.npy"), grpc_answer)
    for binary in ("False", "True"):
        response = report[f"response_{binary}"]
        assert (response["model_name"], response["model_version"], response["id"]) == ("digits", "1", f"http-{binary}")
    (stats,) = report["statistics"]["model_stats"]
    assert stats["inference_count"] == 4 * 6
    assert report["all_statistics"]["model_stats"][0]["name"] == "digits"
    assert report["index"][0]["state"] == "READY"
    assert report["unknown_model"]["status"] == "404" and "unknown model 'nope'" in report["unknown_model"]["message"]
    assert report["wrong_shape"]["status"] == "400" and "'pixels'" in report["wrong_shape"]["message"]
    assert report["load"]["status"] == "501" and "edge-agent install" in report["load"]["message"]
    assert report["live_after"]


@needs_tritonclient
def test_tritonclient_http_shared_memory_works_unchanged(serve_http: ServeHttp, tmp_path: Path) -> None:
    s = serve_http("digits:1")
    pixels = digits_inputs(5, offset=80)
    np.save(tmp_path / "in.npy", pixels)
    prefix = f"edgefleet-http-{uuid.uuid4().hex[:12]}"
    done = subprocess.run(
        [sys.executable, str(PROBE), "shm", s.url, str(tmp_path / "in.npy"), str(tmp_path / "out"), prefix],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = json.loads(done.stdout)
    assert "shared_memory" in report["extensions"]
    regions = {"in": pixels.nbytes, "out": 5 * 10 * 4}
    want_status = [
        {"name": f"{prefix}-{r}", "key": f"/{prefix}-{r}", "offset": 0, "byte_size": b} for r, b in regions.items()
    ]
    assert report["status"] == want_status and report["status_one"] == want_status[:1]
    assert report["status_unknown"]["status"] == "404" and "'nope'" in report["status_unknown"]["message"]
    assert report["duplicate"]["status"] == "409" and "already in manager" in report["duplicate"]["message"]
    assert report["bad_key"]["status"] == "400" and "not a POSIX shm name" in report["bad_key"]["message"]
    assert report["cuda_status"] == []
    grpc_answer = s.grpc.client().infer("digits", {"pixels": pixels}).outputs["probabilities"]
    np.testing.assert_array_equal(np.load(tmp_path / "out-shm.npy"), grpc_answer)
    np.testing.assert_array_equal(np.load(tmp_path / "out-binary.npy"), grpc_answer)
    assert report["response"]["id"] == "shm-1"
    assert report["response"]["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [5, 10]}]
    for case, says in (
        ("unregistered", "Unable to find shared memory region: 'unregistered'"),
        ("size_mismatch", f"need {pixels.nbytes}"),
        ("output_too_small", "should be at least 200 bytes"),
    ):
        assert report[case]["status"] == "400" and says in report[case]["message"], report[case]
    assert report["status_after_errors"] == want_status
    assert report["after_errors"]["outputs"] == report["response"]["outputs"]
    assert report["after_unregister"] == want_status[1:]
    assert report["unregister_unknown"]["status"] == "OK"
    assert report["after_unregister_all"] == []


# --- errors, config, sockets ---------------------------------------------------------------------------------


def test_every_edge_runtime_error_has_an_http_status() -> None:
    unmapped = [c.__name__ for c in ERROR_CLASSES if c not in HTTP_STATUS]
    assert not unmapped, f"add these to edge_runtime/kserve/http_app.py HTTP_STATUS: {unmapped}"
    assert HTTP_STATUS[errors.RequestTooLarge] == 413 and HTTP_STATUS[errors.Overloaded] == 503


@pytest.fixture
def failing_http(short_dir: Path) -> Iterator[tuple[FailingRepository, HttpInferenceServer]]:
    repo = FailingRepository()
    loop = LoopThread()
    section = ServerSection(
        unix_socket="", tcp_address="", http_unix_socket=str(short_dir / "h.sock"), http_tcp_address=""
    )
    server = loop.run(HttpInferenceServer.start(repo, section, "test"))  # type: ignore[arg-type]
    assert server is not None
    try:
        yield repo, server
    finally:
        loop.run(server.stop(1.0))
        loop.close()
    assert not loop.slow.blocking()


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_each_error_reaches_the_client_as_its_http_status(
    failing_http: tuple[FailingRepository, HttpInferenceServer], cls: type[EdgeRuntimeError]
) -> None:
    repo, server = failing_http
    repo.error = cls(f"the reason for {cls.__name__}")
    served = HttpServed(None, server)  # type: ignore[arg-type]
    for answer in (served.infer(digits_doc(digits_inputs(1))), served.call("GET", "/v2/models/digits/stats")):
        assert (answer.status, answer.error) == (HTTP_STATUS[cls], f"the reason for {cls.__name__}")


def test_an_unexpected_exception_is_a_500_with_a_generic_message(
    failing_http: tuple[FailingRepository, HttpInferenceServer],
) -> None:
    repo, server = failing_http
    repo.error = KeyError("secret-internal-detail")
    served = HttpServed(None, server)  # type: ignore[arg-type]
    with capture_logs() as logs:
        answer = served.infer(digits_doc(digits_inputs(1)))
    assert (answer.status, answer.error) == (500, "internal error in edge-agent; see its log")
    assert any("secret-internal-detail" in e.get("error", "") for e in logs)
    assert served.call("GET", "/v2/health/live").status == 200


def test_without_a_registry_shared_memory_is_refused(
    failing_http: tuple[FailingRepository, HttpInferenceServer],
) -> None:
    _repo, server = failing_http
    served = HttpServed(None, server)  # type: ignore[arg-type]
    refused = served.call("GET", "/v2/systemsharedmemory/status")
    assert refused.status == 501 and "shared memory is not available over HTTP" in refused.error
    assert served.call("POST", "/v2/cudasharedmemory/region/g/register", b"{}").status == 501
    assert "shared_memory" not in served.call("GET", "/v2").json()["extensions"]
    for doc in (shm_doc(1, shm_params("in", 256)), shm_doc(1, outputs=shm_params("out", 40), data=[0.0] * 64)):
        answer = served.infer(doc)
        assert answer.status == 400 and "none is served here" in answer.error, answer.body


@pytest.mark.parametrize(
    ("server", "reason"),
    [
        ({"http_tcp_address": "0.0.0.0:8000"}, "server.http_tcp_address host '0.0.0.0' is not a loopback"),
        ({"http_tcp_address": "nohost"}, "server.http_tcp_address"),
        ({"http_unix_socket": "/tmp/same.sock", "unix_socket": "/tmp/same.sock"}, "give HTTP its own socket"),
        ({"http_tcp_address": "127.0.0.1:9001", "tcp_address": "127.0.0.1:9001"}, "takes server.tcp_address's port"),
        ({"http_unix_socket": "/tmp/" + "x" * 120}, "server.http_unix_socket"),
    ],
)
def test_bad_http_addresses_are_config_errors(server: dict[str, str], reason: str) -> None:
    with pytest.raises(ConfigError, match="server.http") as info:
        check_http_addresses(ServerSection(**server))
    assert reason in str(info.value)


def test_http_is_off_when_both_addresses_are_empty(short_dir: Path) -> None:
    loop = LoopThread()
    try:
        section = ServerSection(http_unix_socket="", http_tcp_address="")
        assert loop.run(HttpInferenceServer.start(FailingRepository(), section, "t")) is None  # type: ignore[arg-type]
    finally:
        loop.close()


def test_the_socket_is_0660_a_stale_one_is_replaced_and_a_live_one_refused(short_dir: Path) -> None:
    path = short_dir / "h.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays: what an agent killed with -9 leaves
    loop = LoopThread()
    section = ServerSection(http_unix_socket=str(path), http_tcp_address="")
    server = loop.run(HttpInferenceServer.start(FailingRepository(), section, "t"))  # type: ignore[arg-type]
    try:
        assert server is not None and stat.S_IMODE(os.stat(path).st_mode) == 0o660
        with pytest.raises(ConfigError, match=f"server.http_unix_socket {path} is in use by another process"):
            loop.run(HttpInferenceServer.start(FailingRepository(), section, "t"))  # type: ignore[arg-type]
        assert HttpServed(None, server).call("GET", "/v2/health/live").status == 200  # type: ignore[arg-type]
    finally:
        if server is not None:
            loop.run(server.stop(1.0))
        loop.close()
    assert not path.exists()
