"""The last desired state the agent accepted, kept on disk so a restart converges to it with the cloud away.

`{data_dir}/control/desired.pb`: a header, a CRC-32 and the serialized edgefleet.v1.DesiredState, replaced
atomically (protobuf parses most random bytes without complaint; the CRC tells damage apart). Both methods
block (call off the loop). Not for deciding whether a state is acceptable (the converger checks the device id
and the generation) nor for what was reached (that is reported, and the model store holds it).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import structlog
from google.protobuf.message import DecodeError

from edgefleet.durable import write_atomic
from edgefleet.proto.edgefleet.v1.state_pb2 import DesiredState

__all__ = ["DESIRED_FILE", "MAX_DESIRED_BYTES", "DesiredStore"]

log = structlog.get_logger(__name__)

DESIRED_FILE = Path("control") / "desired.pb"
# A desired state is a few models and a policy document of at most 64 KiB; a larger file is not one we wrote.
MAX_DESIRED_BYTES = 4 * 1024 * 1024
_MAGIC = b"edgefleet-desired/1\n"
_CRC = struct.Struct(">I")


class DesiredStore:
    """Saves and loads the one desired state of this device."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / DESIRED_FILE

    def save(self, state: DesiredState) -> None:
        """Replace the saved state with `state` (durable when this returns)."""
        payload = state.SerializeToString()
        write_atomic(self.path, _MAGIC + _CRC.pack(zlib.crc32(payload)) + payload, mode=0o600)

    def load(self) -> DesiredState | None:
        """The saved state; None when there is none or the file is damaged (logged: the cloud sends it again)."""
        try:
            with self.path.open("rb") as f:
                raw = f.read(MAX_DESIRED_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("control.desired_unreadable", path=str(self.path), error=exc.strerror)
            return None
        try:
            return _parse(raw)
        except ValueError as exc:
            log.warning("control.desired_damaged", path=str(self.path), error=str(exc))
            return None


def _parse(raw: bytes) -> DesiredState:
    if len(raw) > MAX_DESIRED_BYTES:
        raise ValueError(f"larger than {MAX_DESIRED_BYTES} bytes")
    if not raw.startswith(_MAGIC) or len(raw) < len(_MAGIC) + _CRC.size:
        raise ValueError("not a saved desired state (wrong header)")
    (crc,) = _CRC.unpack_from(raw, len(_MAGIC))
    payload = raw[len(_MAGIC) + _CRC.size :]
    if zlib.crc32(payload) != crc:
        raise ValueError("checksum mismatch: the file was damaged")
    try:
        return DesiredState.FromString(payload)
    except DecodeError as exc:
        raise ValueError(f"not a DesiredState ({exc})") from None
