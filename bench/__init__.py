"""Edgefleet's benchmarks: each measures our path and its raw baseline in the same run and prints the ratio.

Run them all with `python -m bench --models build/models` (`make bench`); results land in bench/results/.
"""

__all__ = ["BENCHMARKS"]

# name -> module under bench/ with run(options) -> Report
BENCHMARKS = ("inproc", "kserve_grpc", "agent_footprint", "outbox_append", "uplink_e2e", "telemetry_ingest")
