"""Triton's shared-memory extension on edge-agent: the registry over real POSIX shm segments in /dev/shm, the
RPCs through a real gRPC channel, and tritonclient's own shared-memory utilities in a subprocess."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edge_runtime.errors import InvalidInput, RequestTooLarge
from edge_runtime.inference.types import InferRequest
from edge_runtime.kserve.shm import (
    BYTE_SIZE_PARAMETER,
    OFFSET_PARAMETER,
    REGION_PARAMETER,
    SHM_DIR,
    ShmRef,
    SystemSharedMemory,
    check_owner,
    shm_ref,
)
from edgefleet.proto.inference import grpc_service_pb2 as pb
from tests.edge_runtime.kserve.conftest import Serve, digits_inputs, rpc_error

PROBE = Path(__file__).with_name("triton_shm_probe.py")
HAS_TRITONCLIENT = importlib.util.find_spec("tritonclient") is None

Segment = Callable[..., shared_memory.SharedMemory]


@pytest.fixture
def segment() -> Iterator[Segment]:
    """segment(size) -> a new POSIX shm segment (a file in /dev/shm), unlinked at teardown."""
    made: list[shared_memory.SharedMemory] = []

    def make(size: int, data: bytes = b"") -> shared_memory.SharedMemory:
        seg = shared_memory.SharedMemory(f"edgefleet-test-{uuid.uuid4().hex[:12]}", create=True, size=size)
        seg.buf[: len(data)] = data
        made.append(seg)
        return seg

    yield make
    for seg in made:
        seg.close()
        with contextlib.suppress(FileNotFoundError):  # a test may have removed it
            seg.unlink()


@pytest.fixture
def registry() -> Iterator[SystemSharedMemory]:
    shm = SystemSharedMemory()
    yield shm
    shm.close()


def key_of(seg: shared_memory.SharedMemory) -> str:
    return "/" + seg.name.lstrip("/")


# -- parameters -------------------------------------------------------------------------------------------


def test_a_tensor_without_shared_memory_parameters_has_no_reference() -> None:
    assert shm_ref("x", {}) is None
    assert shm_ref("x", {"other": 1}) is None
    assert shm_ref("x", {REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: 8}) == ShmRef("r", 0, 8)
    assert shm_ref("x", {REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: 8, OFFSET_PARAMETER: 4}) == ShmRef("r", 4, 8)


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({BYTE_SIZE_PARAMETER: 8}, "without 'shared_memory_region'"),
        ({OFFSET_PARAMETER: 0}, "without 'shared_memory_region'"),
        ({REGION_PARAMETER: "r"}, "must be specified along with"),
        ({REGION_PARAMETER: 3, BYTE_SIZE_PARAMETER: 8}, "non-empty string_param"),
        ({REGION_PARAMETER: "", BYTE_SIZE_PARAMETER: 8}, "non-empty string_param"),
        ({REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: "8"}, "non-negative int64_param"),
        ({REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: True}, "non-negative int64_param"),
        ({REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: -1}, "non-negative int64_param"),
        ({REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: 8, OFFSET_PARAMETER: -8}, "non-negative int64_param"),
        ({REGION_PARAMETER: "r", BYTE_SIZE_PARAMETER: 8, OFFSET_PARAMETER: 1.5}, "non-negative int64_param"),
    ],
)
def test_a_partial_or_ill_typed_reference_names_the_tensor(params: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidInput, match=says) as info:
        shm_ref("pixels", params)
    assert "'pixels'" in str(info.value)


# -- the registry -----------------------------------------------------------------------------------------


def test_register_status_and_unregister(registry: SystemSharedMemory, segment: Segment) -> None:
    a, b = segment(4096), segment(100)
    registry.register("a", key_of(a), 0, 4096)
    registry.register("b", key_of(b), 10, 90)
    assert [(s.name, s.key, s.offset, s.byte_size) for s in registry.status()] == [
        ("a", key_of(a), 0, 4096),
        ("b", key_of(b), 10, 90),
    ]
    assert [s.name for s in registry.status("b")] == ["b"]
    with pytest.raises(InvalidInput, match="Unable to find system shared memory region: 'nope'"):
        registry.status("nope")
    registry.unregister("nope")  # as Triton: no error
    registry.unregister("a")
    assert [s.name for s in registry.status()] == ["b"]
    registry.unregister()
    assert registry.status() == []
    assert registry.mapped() == (0, 0)


def test_an_input_view_is_the_segment_itself_not_a_copy(registry: SystemSharedMemory, segment: Segment) -> None:
    seg = segment(5000)
    values = np.arange(6, dtype=np.float32)
    seg.buf[4100:4124] = values.tobytes()
    registry.register("r", key_of(seg), 4000, 1000)  # not page-aligned: the mapping starts below it
    view = registry.input_view("x", ShmRef("r", 100, 24), 24)
    array = np.frombuffer(view, dtype=np.float32)
    np.testing.assert_array_equal(array, values)
    seg.buf[4100:4104] = np.float32(42).tobytes()
    assert array[0] == 42  # the app's write shows through: zero-copy
    assert view.readonly
    del array, view


def test_an_output_is_written_into_its_region(registry: SystemSharedMemory, segment: Segment) -> None:
    seg = segment(64)
    registry.register("out", key_of(seg), 16, 48)
    result = np.array([[1.5, 2.5], [3.5, 4.5]], dtype=np.float32)
    registry.write_output("y", ShmRef("out", 8, 16), result)
    np.testing.assert_array_equal(np.frombuffer(bytes(seg.buf[24:40]), dtype=np.float32), result.ravel())
    with pytest.raises(InvalidInput, match=r"output 'y' \(8 bytes\) should be at least 16 bytes"):
        registry.write_output("y", ShmRef("out", 0, 8), result)


@pytest.mark.parametrize(
    ("ref", "nbytes", "says"),
    [
        (ShmRef("nope", 0, 8), 8, "Unable to find shared memory region: 'nope'"),
        (ShmRef("r", 64, 8), 8, "Invalid offset for shared memory region"),
        (ShmRef("r", 2**63, 8), 8, "Invalid offset for shared memory region"),
        (ShmRef("r", 60, 8), 8, "Invalid offset \\+ byte size"),
        (ShmRef("r", 8, 2**64 - 1), 2**64 - 1, "Invalid offset \\+ byte size"),
        (ShmRef("r", 0, 8), 12, "gives 8 bytes .* need 12"),
    ],
)
def test_a_bad_reference_is_refused_and_changes_nothing(
    registry: SystemSharedMemory, segment: Segment, ref: ShmRef, nbytes: int, says: str
) -> None:
    seg = segment(64)
    registry.register("r", key_of(seg), 0, 64)
    before = registry.status()
    with pytest.raises(InvalidInput, match=says) as info:
        registry.input_view("pixels", ref, nbytes)
    assert "'pixels'" in str(info.value)
    if ref.byte_size == nbytes:  # the same checks guard outputs
        with pytest.raises(InvalidInput, match=says):
            registry.check_output("pixels", ref)
    assert registry.status() == before
    assert registry.mapped() == (1, 1)


def test_a_segment_truncated_after_registering_is_refused_not_a_sigbus(
    registry: SystemSharedMemory, segment: Segment
) -> None:
    seg = segment(3 * 4096)
    registry.register("r", key_of(seg), 0, 3 * 4096)
    os.truncate(SHM_DIR / seg.name.lstrip("/"), 4096)
    with pytest.raises(InvalidInput, match="which is now 4096 bytes"):
        registry.input_view("pixels", ShmRef("r", 8192, 8), 8)
    with pytest.raises(InvalidInput, match="which is now 4096 bytes"):
        registry.write_output("y", ShmRef("r", 8192, 8), np.zeros(2, np.float32))
    assert bytes(registry.input_view("pixels", ShmRef("r", 0, 8), 8)) == bytes(8)  # what is left still serves


def test_registering_refuses_what_it_must_not_map(registry: SystemSharedMemory, segment: Segment) -> None:
    seg = segment(64)
    registry.register("r", key_of(seg), 0, 64)
    with pytest.raises(InvalidInput, match="'r' already in manager"):
        registry.register("r", key_of(segment(64)), 0, 64)
    with pytest.raises(InvalidInput, match="invalid args"):
        registry.register("past", key_of(seg), 32, 64)
    with pytest.raises(InvalidInput, match="byte_size must be positive"):
        registry.register("empty", key_of(seg), 0, 0)
    with pytest.raises(InvalidInput, match="no such segment"):
        registry.register("gone", f"/edgefleet-test-missing-{uuid.uuid4().hex}", 0, 8)
    with pytest.raises(InvalidInput, match="needs a name"):
        registry.register("", key_of(seg), 0, 8)
    assert [(s.name, s.byte_size) for s in registry.status()] == [("r", 64)]


@pytest.mark.parametrize(
    "key", ["", "/", "a/b", "/a/b", "//a", "..", "/..", ".", "../etc/passwd", "x" * 256, "sem.mp-1", "a\nb"]
)
def test_a_key_that_is_not_a_plain_posix_shm_name_is_refused(registry: SystemSharedMemory, key: str) -> None:
    with pytest.raises(InvalidInput, match="is not a POSIX shm name"):
        registry.register("r", key, 0, 8)
    assert registry.status() == []


def test_a_symlink_in_dev_shm_is_never_followed(registry: SystemSharedMemory, segment: Segment) -> None:
    seg = segment(64)
    link = SHM_DIR / f"edgefleet-test-link-{uuid.uuid4().hex[:12]}"
    link.symlink_to(SHM_DIR / seg.name.lstrip("/"))
    try:
        with pytest.raises(InvalidInput, match="symbolic link"):
            registry.register("r", f"/{link.name}", 0, 8)
    finally:
        link.unlink()
    directory = SHM_DIR / f"edgefleet-test-dir-{uuid.uuid4().hex[:12]}"
    directory.mkdir()
    try:
        with pytest.raises(InvalidInput, match="Unable to open shared memory region"):
            registry.register("d", f"/{directory.name}", 0, 8)
    finally:
        directory.rmdir()
    assert registry.status() == []


def _stat(uid: int, gid: int, mode: int) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, gid, 64, 0, 0, 0))


def test_only_the_agents_own_or_group_shared_segments_are_mapped() -> None:
    uid, gid, other = os.geteuid(), os.getegid(), os.geteuid() + 12345
    check_owner("r", "/k", _stat(uid, gid + 1, stat.S_IFREG | 0o600))  # the agent's user's own
    check_owner("r", "/k", _stat(other, gid, stat.S_IFREG | 0o660))  # shared read-write with its group
    for refused in (
        _stat(other, gid, stat.S_IFREG | 0o640),  # the group may only read it
        _stat(other, gid + 1, stat.S_IFREG | 0o666),  # another group's, even if world-writable
        _stat(other, gid + 1, stat.S_IFREG | 0o600),
    ):
        with pytest.raises(InvalidInput, match="chmod g\\+rw"):
            check_owner("r", "/k", refused)
    with pytest.raises(InvalidInput, match="not a regular shm file"):
        check_owner("r", "/k", _stat(uid, gid, stat.S_IFIFO | 0o600))


def test_unregistering_a_region_in_use_defers_its_unmap(registry: SystemSharedMemory, segment: Segment) -> None:
    seg = segment(64, data=b"\x07" * 64)
    registry.register("r", key_of(seg), 0, 64)
    view = registry.input_view("x", ShmRef("r", 0, 16), 16)
    array = np.frombuffer(view, dtype=np.uint8)
    registry.unregister("r")  # mmap.close() would raise BufferError here: the unmap waits
    assert registry.status() == []
    assert registry.mapped() == (0, 1)
    with pytest.raises(InvalidInput, match="Unable to find shared memory region"):
        registry.input_view("x", ShmRef("r", 0, 16), 16)
    assert array.sum() == 7 * 16  # the request still reads valid memory
    del array
    view.release()
    assert registry.mapped() == (0, 0)
    registry.register("r", key_of(seg), 0, 64)  # the name is free again


def test_close_with_a_view_outstanding_does_not_crash(segment: Segment) -> None:
    registry = SystemSharedMemory()
    seg = segment(64, data=b"\x01" * 64)
    registry.register("r", key_of(seg), 0, 64)
    view = registry.input_view("x", ShmRef("r", 0, 8), 8)
    registry.close()
    assert bytes(view) == b"\x01" * 8
    with pytest.raises(InvalidInput, match="shutting down"):
        registry.register("again", key_of(seg), 0, 8)
    view.release()


def test_the_number_of_regions_and_mapped_bytes_is_limited(segment: Segment) -> None:
    registry = SystemSharedMemory(max_regions=2, max_mapped_bytes=100)
    try:
        seg = segment(64)
        registry.register("a", key_of(seg), 0, 40)
        with pytest.raises(RequestTooLarge, match="past edge-agent's limit of 100"):
            registry.register("b", key_of(seg), 0, 64)
        registry.register("b", key_of(seg), 0, 60)
        with pytest.raises(RequestTooLarge, match="2 regions are registered"):
            registry.register("c", key_of(seg), 0, 1)
        assert [s.name for s in registry.status()] == ["a", "b"]
    finally:
        registry.close()


def test_cuda_regions_answer_a_clear_error_without_cuda(registry: SystemSharedMemory) -> None:
    if importlib.util.find_spec("pycuda") is not None:
        pytest.skip("pycuda is installed: the gpu test covers CUDA shared memory")
    with pytest.raises(InvalidInput, match="no CUDA"):
        registry.register_cuda("c", bytes(64), 0, 8)
    assert registry.cuda_status() == []
    with pytest.raises(InvalidInput, match="Unable to find cuda shared memory region: 'c'"):
        registry.cuda_status("c")


# -- through gRPC -----------------------------------------------------------------------------------------


def shm_input(request: pb.ModelInferRequest, name: str, shape: tuple[int, ...], region: str, size: int) -> None:
    tensor = request.inputs.add(name=name, datatype="FP32", shape=shape)
    tensor.parameters[REGION_PARAMETER].string_param = region
    tensor.parameters[BYTE_SIZE_PARAMETER].int64_param = size


def test_inputs_and_outputs_in_shared_memory_over_grpc(serve: Serve, segment: Segment) -> None:
    served = serve("digits:1")
    stub = served.stub()
    pixels = digits_inputs(4)
    seg_in, seg_out = segment(pixels.nbytes, data=pixels.tobytes()), segment(4 * 10 * 4)
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="in", key=key_of(seg_in), byte_size=pixels.nbytes)
    )
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="out", key=key_of(seg_out), byte_size=160)
    )

    request = pb.ModelInferRequest(model_name="digits")
    shm_input(request, "pixels", pixels.shape, "in", pixels.nbytes)
    output = request.outputs.add(name="probabilities")
    output.parameters[REGION_PARAMETER].string_param = "out"
    output.parameters[BYTE_SIZE_PARAMETER].int64_param = 160
    response = stub.ModelInfer(request)

    expected = served.repo.infer(InferRequest("digits", {"pixels": pixels})).outputs["probabilities"]
    np.testing.assert_array_equal(np.frombuffer(bytes(seg_out.buf), np.float32).reshape(4, 10), expected)
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("probabilities", "FP32", [4, 10])
    assert list(response.raw_output_contents) == [b""]  # as Triton: an empty entry for an output in shm

    # An input in shared memory must not also carry contents; raw_input_contents skips shm inputs.
    both = pb.ModelInferRequest()
    both.CopyFrom(request)
    both.raw_input_contents.append(pixels.tobytes())
    error = rpc_error(lambda: stub.ModelInfer(both))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents has 1 entries for 0 inputs" in (error.details() or "")
    typed = pb.ModelInferRequest()
    typed.CopyFrom(request)
    typed.inputs[0].contents.fp32_contents.extend(pixels.ravel().tolist())
    error = rpc_error(lambda: stub.ModelInfer(typed))
    assert "also carries contents" in (error.details() or "")

    # Unregistering while nothing reads it unmaps at once; the name is gone.
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="in"))
    error = rpc_error(lambda: stub.ModelInfer(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Unable to find shared memory region: 'in'" in (error.details() or "")
    status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert list(status.regions) == ["out"]
    assert (status.regions["out"].key, status.regions["out"].byte_size) == (key_of(seg_out), 160)


def test_bad_registrations_get_their_status_over_grpc(serve: Serve, segment: Segment) -> None:
    served = serve("digits:1")
    stub = served.stub()
    seg = segment(64)
    register = stub.SystemSharedMemoryRegister
    register(pb.SystemSharedMemoryRegisterRequest(name="r", key=key_of(seg), byte_size=64))
    invalid, exists = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS
    cases = {
        "already in manager": (exists, pb.SystemSharedMemoryRegisterRequest(name="r", key=key_of(seg), byte_size=64)),
        "not a POSIX shm name": (
            invalid,
            pb.SystemSharedMemoryRegisterRequest(name="x", key="/../etc/passwd", byte_size=8),
        ),
        "invalid args": (
            invalid,
            pb.SystemSharedMemoryRegisterRequest(name="x", key=key_of(seg), offset=2**64 - 1, byte_size=8),
        ),
        "no such segment": (
            invalid,
            pb.SystemSharedMemoryRegisterRequest(name="x", key="/edgefleet-test-none", byte_size=8),
        ),
    }
    for says, (code, request) in cases.items():
        error = rpc_error(lambda request=request: register(request))
        assert error.code() == code, says
        assert says in (error.details() or ""), error.details()
    error = rpc_error(lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND  # as Triton
    assert "Unable to find system shared memory region: 'nope'" in (error.details() or "")
    assert list(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions) == ["r"]
    error = rpc_error(
        lambda: stub.CudaSharedMemoryRegister(
            pb.CudaSharedMemoryRegisterRequest(name="c", raw_handle=bytes(64), byte_size=8)
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "CUDA" in (error.details() or "")
    assert "shared_memory" in stub.ServerMetadata(pb.ServerMetadataRequest()).extensions


def test_unregistering_while_requests_read_the_region_never_fails_them_with_an_internal_error(
    serve: Serve, segment: Segment
) -> None:
    served = serve("mobilenet-bench:1")
    stub = served.stub()
    size, slots = 3 * 224 * 224 * 4, 8
    images = np.random.default_rng(3).random((slots, 1, 3, 224, 224), dtype=np.float32)
    seg = segment(size * slots, data=images.tobytes())
    register = stub.SystemSharedMemoryRegister
    register(pb.SystemSharedMemoryRegisterRequest(name="in", key=key_of(seg), byte_size=size * slots))
    requests = []
    for slot in range(slots):
        request = pb.ModelInferRequest(model_name="mobilenet-bench")
        shm_input(request, "input", (1, 3, 224, 224), "in", size)
        request.inputs[0].parameters[OFFSET_PARAMETER].int64_param = slot * size
        requests.append(request)
    calls = [stub.ModelInfer.future(r) for r in requests]
    calls[0].result(timeout=60)  # the first is answered: the others are queued or running on views of "in"
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="in"))
    answered = 0
    for slot, call in enumerate(calls):
        try:
            response = call.result(timeout=60)
        except grpc.RpcError as error:  # decoded after the unregister
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert "Unable to find shared memory region: 'in'" in (error.details() or "")
            continue
        expected = served.repo.infer(InferRequest("mobilenet-bench", {"input": images[slot]})).outputs["logits"]
        got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        answered += 1
    # At least the first; usually every one, decoded onto views of "in" before the unregister and read on.
    assert answered >= 1
    assert list(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions) == []
    register(pb.SystemSharedMemoryRegisterRequest(name="in", key=key_of(seg), byte_size=size))  # the name is free


# -- tritonclient, unchanged ------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TRITONCLIENT, reason='tritonclient is not installed (pip install "tritonclient>=2.73")')
def test_tritonclient_shared_memory_works_against_our_server(serve: Serve, tmp_path: Path) -> None:
    served = serve("digits:1")
    pixels = digits_inputs(5, offset=10)
    np.save(tmp_path / "in.npy", pixels)
    prefix = f"edgefleet-test-{uuid.uuid4().hex[:8]}"
    args = ["system", served.tcp, str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), prefix]
    done = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = json.loads(done.stdout)

    assert "shared_memory" in report["extensions"]
    expected = served.repo.infer(InferRequest("digits", {"pixels": pixels})).outputs["probabilities"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
    assert report["response"]["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["5", "10"]}]
    assert report["raw_entries"] == 1  # an empty one: tritonclient finds outputs by their index in it

    regions = report["status"]["regions"]
    assert sorted(regions) == [f"{prefix}-in", f"{prefix}-out"]
    assert regions[f"{prefix}-in"]["key"] == f"/{prefix}-in"
    assert regions[f"{prefix}-in"]["byte_size"] == str(pixels.nbytes)
    assert list(report["status_one"]["regions"]) == [f"{prefix}-in"]
    for case, code, says in (
        ("status_unknown", "NOT_FOUND", "Unable to find system shared memory region: 'nope'"),
        ("duplicate", "ALREADY_EXISTS", "already in manager"),
        ("bad_key", "INVALID_ARGUMENT", "not a POSIX shm name"),
        ("unregistered", "INVALID_ARGUMENT", "Unable to find shared memory region: 'unregistered'"),
        ("size_mismatch", "INVALID_ARGUMENT", "'pixels'"),
        ("output_too_small", "INVALID_ARGUMENT", "should be at least 200 bytes"),
    ):
        assert report[case]["status"] == f"StatusCode.{code}", (case, report[case])
        assert says in report[case]["message"], (case, report[case])
    assert report["after_errors"]["outputs"][0]["name"] == "probabilities"
    assert list(report["after_unregister"]["regions"]) == [f"{prefix}-out"]
    assert report["unregister_unknown"]["status"] == "OK"
    assert report["after_unregister_all"] == {}
    assert not [p for p in SHM_DIR.iterdir() if p.name.startswith(prefix)]  # the probe cleaned up


def _cuda_usable() -> bool:
    try:
        import pycuda.driver as cuda  # noqa: F401
        import tritonclient.utils.cuda_shared_memory  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_usable(), reason="needs pycuda, cuda-python and an NVIDIA GPU")
def test_tritonclient_cuda_shared_memory_works_against_our_server(serve: Serve, tmp_path: Path) -> None:
    served = serve("digits:1")
    pixels = digits_inputs(3)
    np.save(tmp_path / "in.npy", pixels)
    args = ["cuda", served.tcp, str(tmp_path / "in.npy"), str(tmp_path / "out.npy")]
    done = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = json.loads(done.stdout)
    expected = served.repo.infer(InferRequest("digits", {"pixels": pixels})).outputs["probabilities"]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-6)
    assert sorted(report["status"]["regions"]) == ["cuda-in", "cuda-out"]
    assert report["after_unregister_all"] == {}
