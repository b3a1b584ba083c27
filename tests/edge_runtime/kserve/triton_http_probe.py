"""Run tritonclient.http in its own process against a server (test_http.py), as an app outside the agent would.

python triton_http_probe.py client URL IN OUT   -> JSON on stdout; digits answers for IN.npy in OUT-*.npy
python triton_http_probe.py shm URL IN OUT PREFIX  -> the same over system shared memory (tritonclient.utils's
                                                  segments /PREFIX-in and /PREFIX-out), and over binary data
python triton_http_probe.py bench URL MODEL IN N [grpc TARGET]  -> p50/p90 µs of N binary infers
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def error_of(call: Any) -> dict[str, str]:
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return {"status": "OK", "message": ""}


def client(url: str, source: str, result: str) -> None:
    import numpy as np
    import tritonclient.http as triton

    pixels = np.load(source)
    report: dict[str, Any] = {}
    with triton.InferenceServerClient(url) as c:
        report["live"] = c.is_server_live()
        report["ready"] = c.is_server_ready()
        report["model_ready"] = c.is_model_ready("digits")
        report["model_ready_v1"] = c.is_model_ready("digits", "1")
        report["unknown_ready"] = c.is_model_ready("nope")
        report["server_metadata"] = c.get_server_metadata()
        report["metadata"] = c.get_model_metadata("digits")
        report["config"] = c.get_model_config("digits")
        for binary in (False, True):
            tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
            tensor.set_data_from_numpy(pixels, binary_data=binary)
            answer = c.infer(
                "digits",
                [tensor],
                outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)],
                request_id=f"http-{binary}",
                priority=1,
                timeout=5_000_000,
            )
            report[f"response_{binary}"] = answer.get_response()
            np.save(f"{result}-{binary}.npy", answer.as_numpy("probabilities"))
        # No outputs named: tritonclient asks for every output in binary (binary_data_output).
        tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        np.save(f"{result}-all.npy", c.infer("digits", [tensor]).as_numpy("probabilities"))
        zipped = c.infer(
            "digits", [tensor], request_compression_algorithm="gzip", response_compression_algorithm="gzip"
        )
        np.save(f"{result}-gzip.npy", zipped.as_numpy("probabilities"))
        report["statistics"] = c.get_inference_statistics("digits")
        report["all_statistics"] = c.get_inference_statistics()
        report["index"] = c.get_model_repository_index()
        report["unknown_model"] = error_of(lambda: c.infer("nope", [tensor]))
        short = triton.InferInput("pixels", [1, 32], "FP32")
        short.set_data_from_numpy(np.zeros((1, 32), np.float32))
        report["wrong_shape"] = error_of(lambda: c.infer("digits", [short]))
        report["load"] = error_of(lambda: c.load_model("digits"))
        report["live_after"] = c.is_server_live()
    json.dump(report, sys.stdout)


def shm(url: str, source: str, result: str, prefix: str) -> None:
    """Register, infer with input and output in shared memory, status, unregister; bad references; the binary
    answer to compare with."""
    import numpy as np
    import tritonclient.http as triton
    import tritonclient.utils.shared_memory as shared

    pixels = np.load(source)
    out_bytes = pixels.shape[0] * 10 * 4
    report: dict[str, Any] = {}
    regions = [
        shared.create_shared_memory_region(f"{prefix}-in", f"/{prefix}-in", pixels.nbytes),
        shared.create_shared_memory_region(f"{prefix}-out", f"/{prefix}-out", out_bytes),
    ]
    try:
        shared.set_shared_memory_region(regions[0], [pixels])
        with triton.InferenceServerClient(url) as c:
            report["extensions"] = c.get_server_metadata()["extensions"]
            c.register_system_shared_memory(f"{prefix}-in", f"/{prefix}-in", pixels.nbytes)
            c.register_system_shared_memory(f"{prefix}-out", f"/{prefix}-out", out_bytes)
            report["status"] = c.get_system_shared_memory_status()
            report["status_one"] = c.get_system_shared_memory_status(f"{prefix}-in")
            report["status_unknown"] = error_of(lambda: c.get_system_shared_memory_status("nope"))
            report["duplicate"] = error_of(
                lambda: c.register_system_shared_memory(f"{prefix}-in", f"/{prefix}-in", pixels.nbytes)
            )
            report["bad_key"] = error_of(lambda: c.register_system_shared_memory("bad", "/../etc/passwd", 8))
            report["cuda_status"] = c.get_cuda_shared_memory_status()

            def request(in_region: str, in_size: int, out_size: int = out_bytes) -> tuple[Any, Any]:
                tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
                tensor.set_shared_memory(in_region, in_size)
                output = triton.InferRequestedOutput("probabilities", binary_data=True)
                output.set_shared_memory(f"{prefix}-out", out_size)
                return tensor, output

            tensor, output = request(f"{prefix}-in", pixels.nbytes)
            answer = c.infer("digits", [tensor], outputs=[output], request_id="shm-1")
            report["response"] = answer.get_response()
            np.save(f"{result}-shm.npy", shared.get_contents_as_numpy(regions[1], np.float32, [pixels.shape[0], 10]))

            binary = triton.InferInput("pixels", list(pixels.shape), "FP32")
            binary.set_data_from_numpy(pixels, binary_data=True)
            wanted = triton.InferRequestedOutput("probabilities", binary_data=True)
            np.save(f"{result}-binary.npy", c.infer("digits", [binary], outputs=[wanted]).as_numpy("probabilities"))

            tensor, output = request("unregistered", pixels.nbytes)
            report["unregistered"] = error_of(lambda: c.infer("digits", [tensor], outputs=[output]))
            tensor, output = request(f"{prefix}-in", pixels.nbytes - 4)
            report["size_mismatch"] = error_of(lambda: c.infer("digits", [tensor], outputs=[output]))
            tensor, small = request(f"{prefix}-in", pixels.nbytes, 8)
            report["output_too_small"] = error_of(lambda: c.infer("digits", [tensor], outputs=[small]))
            report["status_after_errors"] = c.get_system_shared_memory_status()
            tensor, output = request(f"{prefix}-in", pixels.nbytes)
            report["after_errors"] = c.infer("digits", [tensor], outputs=[output]).get_response()

            c.unregister_system_shared_memory(f"{prefix}-in")
            report["after_unregister"] = c.get_system_shared_memory_status()
            report["unregister_unknown"] = error_of(lambda: c.unregister_system_shared_memory("nope"))
            c.unregister_system_shared_memory()
            report["after_unregister_all"] = c.get_system_shared_memory_status()
    finally:
        for region in regions:
            shared.destroy_shared_memory_region(region)
    json.dump(report, sys.stdout)


def bench(url: str, model: str, source: str, n: str, *grpc_target: str) -> None:
    """Median and p90 latency of `n` sequential binary infers over HTTP, with tritonclient.http and with
    http.client (and with tritonclient.grpc given a target)."""
    import numpy as np
    import tritonclient.http as triton_http

    inputs = dict(np.load(source))
    report: dict[str, Any] = {}

    def timed(call: Any) -> dict[str, float]:
        for _ in range(10):
            call()
        took = []
        for _ in range(int(n)):
            began = time.perf_counter()
            call()
            took.append(time.perf_counter() - began)
        took.sort()
        return {"p50_us": took[len(took) // 2] * 1e6, "p90_us": took[len(took) * 9 // 10] * 1e6}

    with triton_http.InferenceServerClient(url) as c:
        tensors = []
        for name, array in inputs.items():
            t = triton_http.InferInput(name, list(array.shape), _datatype(array))
            t.set_data_from_numpy(array, binary_data=True)
            tensors.append(t)
        report["http"] = timed(lambda: c.infer(model, tensors))
    report["http_client"] = timed(_raw_infer(url, model, inputs))
    if grpc_target:
        import tritonclient.grpc as triton_grpc

        with triton_grpc.InferenceServerClient(grpc_target[1]) as g:
            gtensors = []
            for name, array in inputs.items():
                t = triton_grpc.InferInput(name, list(array.shape), _datatype(array))
                t.set_data_from_numpy(array)
                gtensors.append(t)
            report["grpc"] = timed(lambda: g.infer(model, gtensors))
    json.dump(report, sys.stdout)


def _raw_infer(url: str, model: str, inputs: dict[str, Any]) -> Any:
    """The same binary request over the standard library's http.client: the protocol without a client's cost."""
    import http.client

    host, _, port = url.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port))
    tensors = [
        {"name": n, "datatype": _datatype(a), "shape": list(a.shape), "parameters": {"binary_data_size": a.nbytes}}
        for n, a in inputs.items()
    ]
    head = json.dumps({"inputs": tensors, "parameters": {"binary_data_output": True}}).encode()
    body = b"".join([head, *(a.tobytes() for a in inputs.values())])
    headers = {"Inference-Header-Content-Length": str(len(head))}

    def call() -> None:
        conn.request("POST", f"/v2/models/{model}/infer", body, headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200

    return call


def _datatype(array: Any) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(array.dtype))


if __name__ == "__main__":
    if sys.argv[1:2] == ["client"] and len(sys.argv) == 5:
        client(*sys.argv[2:])
    elif sys.argv[1:2] == ["shm"] and len(sys.argv) == 6:
        shm(*sys.argv[2:])
    elif sys.argv[1:2] == ["bench"] and len(sys.argv) in (6, 8):
        bench(*sys.argv[2:])
    else:
        sys.exit(__doc__)
