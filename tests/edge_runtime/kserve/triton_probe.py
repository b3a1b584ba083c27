"""Run tritonclient in its own process (test_wire_compat.py): it registers the same `inference.*` protobuf
names as edgefleet.proto, so the two cannot share a process.

    python triton_probe.py descriptors            -> a FileDescriptorSet of Triton's grpc_service.proto on stdout
    python triton_probe.py client TARGET IN OUT   -> JSON on stdout; the digits answer for IN.npy in OUT.npy
"""

from __future__ import annotations

import json
import sys
from typing import Any


def descriptors() -> None:
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import service_pb2

    files = descriptor_pb2.FileDescriptorSet()
    pending, seen = [service_pb2.DESCRIPTOR], set()
    while pending:
        file = pending.pop()
        if file.name in seen:
            continue
        seen.add(file.name)
        file.CopyToProto(files.file.add())
        pending.extend(file.dependencies)
    sys.stdout.buffer.write(files.SerializeToString())


def error_of(call: Any) -> dict[str, str]:
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return {"status": "OK", "message": ""}


def client(target: str, source: str, result: str) -> None:
    import numpy as np
    import tritonclient.grpc as triton

    pixels = np.load(source)
    report: dict[str, Any] = {}
    with triton.InferenceServerClient(target) as c:
        report["live"] = c.is_server_live()
        report["ready"] = c.is_server_ready()
        report["model_ready"] = c.is_model_ready("digits")
        report["model_ready_v1"] = c.is_model_ready("digits", "1")
        report["unknown_ready"] = c.is_model_ready("nope")
        report["server_metadata"] = c.get_server_metadata(as_json=True)
        report["metadata"] = c.get_model_metadata("digits", as_json=True)
        tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        answer = c.infer(
            "digits",
            [tensor],
            outputs=[triton.InferRequestedOutput("probabilities")],
            request_id="triton-1",
            priority=1,
            timeout=5_000_000,
        )
        report["response"] = answer.get_response(as_json=True)
        np.save(result, answer.as_numpy("probabilities"))
        report["statistics"] = c.get_inference_statistics("digits", as_json=True)
        report["unknown_model"] = error_of(lambda: c.infer("nope", [tensor]))
        short = triton.InferInput("pixels", [1, 32], "FP32")
        short.set_data_from_numpy(np.zeros((1, 32), np.float32))
        report["wrong_shape"] = error_of(lambda: c.infer("digits", [short]))
        report["index"] = c.get_model_repository_index(as_json=True)
        report["index_ready"] = c.get_model_repository_index(as_json=True)
        report["config"] = c.get_model_config("digits", as_json=True)
        report["config_unknown"] = error_of(lambda: c.get_model_config("nope"))
        report["load"] = error_of(lambda: c.load_model("digits"))
        report["unload"] = error_of(lambda: c.unload_model("digits"))
        report["live_after"] = c.is_server_live()
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    if sys.argv[1:2] == ["descriptors"]:
        descriptors()
    elif sys.argv[1:2] == ["client"] and len(sys.argv) == 5:
        client(*sys.argv[2:])
    else:
        sys.exit(__doc__)
