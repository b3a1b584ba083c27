"""Triton's shared-memory client against edge-agent, in its own process (tritonclient registers the same
`inference.*` protobuf names as edgefleet.proto): tritonclient.utils.shared_memory makes the segments,
tritonclient.grpc registers them and infers. Used by test_shared_memory.py.

    python triton_shm_probe.py system TARGET IN OUT PREFIX   -> JSON on stdout; the shm answer for IN.npy in OUT.npy
    python triton_shm_probe.py cuda TARGET IN OUT             -> the same over CUDA shared memory (needs a GPU)
"""

from __future__ import annotations

import json
import sys
from typing import Any


def error_of(call: Any) -> dict[str, str]:
    from tritonclient.utils import InferenceServerException

    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return {"status": "OK", "message": ""}


def system(target: str, source: str, result: str, prefix: str) -> None:
    import numpy as np
    import tritonclient.grpc as triton
    import tritonclient.utils.shared_memory as shm

    pixels = np.load(source)
    out_bytes = pixels.shape[0] * 10 * 4
    report: dict[str, Any] = {}
    regions = [
        shm.create_shared_memory_region(f"{prefix}-in", f"/{prefix}-in", pixels.nbytes),
        shm.create_shared_memory_region(f"{prefix}-out", f"/{prefix}-out", out_bytes),
    ]
    try:
        shm.set_shared_memory_region(regions[0], [pixels])
        with triton.InferenceServerClient(target) as c:
            report["extensions"] = list(c.get_server_metadata().extensions)
            c.register_system_shared_memory(f"{prefix}-in", f"/{prefix}-in", pixels.nbytes)
            c.register_system_shared_memory(f"{prefix}-out", f"/{prefix}-out", out_bytes)
            report["status"] = c.get_system_shared_memory_status(as_json=True)
            report["status_one"] = c.get_system_shared_memory_status(f"{prefix}-in", as_json=True)
            report["status_unknown"] = error_of(lambda: c.get_system_shared_memory_status("nope"))
            report["duplicate"] = error_of(
                lambda: c.register_system_shared_memory(f"{prefix}-in", f"/{prefix}-in", pixels.nbytes)
            )
            report["bad_key"] = error_of(lambda: c.register_system_shared_memory("bad", "/../etc/passwd", 8))

            def request(in_region: str, in_size: int) -> tuple[Any, Any]:
                tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
                tensor.set_shared_memory(in_region, in_size)
                output = triton.InferRequestedOutput("probabilities")
                output.set_shared_memory(f"{prefix}-out", out_bytes)
                return tensor, output

            tensor, output = request(f"{prefix}-in", pixels.nbytes)
            answer = c.infer("digits", [tensor], outputs=[output], request_id="shm-1")
            report["response"] = answer.get_response(as_json=True)
            report["raw_entries"] = len(answer.get_response().raw_output_contents)
            np.save(result, shm.get_contents_as_numpy(regions[1], np.float32, [pixels.shape[0], 10]))

            tensor, output = request("unregistered", pixels.nbytes)
            report["unregistered"] = error_of(lambda: c.infer("digits", [tensor], outputs=[output]))
            tensor, output = request(f"{prefix}-in", pixels.nbytes - 4)
            report["size_mismatch"] = error_of(lambda: c.infer("digits", [tensor], outputs=[output]))
            small = triton.InferRequestedOutput("probabilities")
            small.set_shared_memory(f"{prefix}-out", 8)
            tensor, _ = request(f"{prefix}-in", pixels.nbytes)
            report["output_too_small"] = error_of(lambda: c.infer("digits", [tensor], outputs=[small]))
            # A bad request fails alone: the next good one is answered.
            tensor, output = request(f"{prefix}-in", pixels.nbytes)
            report["after_errors"] = c.infer("digits", [tensor], outputs=[output]).get_response(as_json=True)

            c.unregister_system_shared_memory(f"{prefix}-in")
            report["after_unregister"] = c.get_system_shared_memory_status(as_json=True)
            report["unregister_unknown"] = error_of(lambda: c.unregister_system_shared_memory("nope"))
            c.unregister_system_shared_memory()
            report["after_unregister_all"] = c.get_system_shared_memory_status(as_json=True)
    finally:
        for region in regions:
            shm.destroy_shared_memory_region(region)
    json.dump(report, sys.stdout)


def cuda(target: str, source: str, result: str) -> None:
    import numpy as np
    import tritonclient.grpc as triton
    import tritonclient.utils.cuda_shared_memory as cudashm

    pixels = np.load(source)
    out_bytes = pixels.shape[0] * 10 * 4
    report: dict[str, Any] = {}
    handles = [
        cudashm.create_shared_memory_region("cuda-in", pixels.nbytes, 0),
        cudashm.create_shared_memory_region("cuda-out", out_bytes, 0),
    ]
    try:
        cudashm.set_shared_memory_region(handles[0], [pixels])
        with triton.InferenceServerClient(target) as c:
            c.register_cuda_shared_memory("cuda-in", cudashm.get_raw_handle(handles[0]), 0, pixels.nbytes)
            c.register_cuda_shared_memory("cuda-out", cudashm.get_raw_handle(handles[1]), 0, out_bytes)
            report["status"] = c.get_cuda_shared_memory_status(as_json=True)
            tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
            tensor.set_shared_memory("cuda-in", pixels.nbytes)
            output = triton.InferRequestedOutput("probabilities")
            output.set_shared_memory("cuda-out", out_bytes)
            report["response"] = c.infer("digits", [tensor], outputs=[output]).get_response(as_json=True)
            np.save(result, cudashm.get_contents_as_numpy(handles[1], np.float32, [pixels.shape[0], 10]))
            c.unregister_cuda_shared_memory()
            report["after_unregister_all"] = c.get_cuda_shared_memory_status(as_json=True)
    finally:
        for handle in handles:
            cudashm.destroy_shared_memory_region(handle)
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    if sys.argv[1:2] == ["system"] and len(sys.argv) == 6:
        system(*sys.argv[2:])
    elif sys.argv[1:2] == ["cuda"] and len(sys.argv) == 5:
        cuda(*sys.argv[2:])
    else:
        sys.exit(__doc__)
