"""The kill -9 test's child: appends records in bursts and prints "seq run i" once each one's future resolved.

Run as a script: `python _appender.py OUTBOX_PATH RUN`. Payloads are a pure function of (run, i), so the
test can check each reported record byte for byte; every third payload is encoded on the writer thread.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

BURST = 20


def payload_for(run: int, i: int) -> bytes:
    digest = hashlib.sha256(f"{run}:{i}".encode()).digest()
    size = 1 + int.from_bytes(digest[:2], "big") % 6000  # some past a page: overflow pages too
    return (digest * (size // len(digest) + 1))[:size]


def main(path: str, run: int) -> None:
    from edge_runtime.outbox import DeferredPayload, Outbox, OutboxRecord
    from edgefleet.logs import configure_logging

    configure_logging("info", sys.stderr)  # stdout carries only the seqs
    outbox = Outbox.open(Path(path), max_bytes=1 << 40, max_age_s=0, commit_interval_s=0.001)
    i = 0
    while True:
        futures = []
        for _ in range(BURST):
            payload = payload_for(run, i)
            given = DeferredPayload(lambda p=payload: p, len(payload)) if i % 3 == 0 else payload
            record = OutboxRecord(time.time_ns() // 1_000_000, "digits", 1, 1, 1, "t", given, f"{run}:{i}")
            futures.append((i, outbox.append(record)))
            i += 1
        for n, future in futures:
            print(f"{future.result()} {run} {n}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
