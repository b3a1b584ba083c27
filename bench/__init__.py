"""Edgefleet's benchmarks: each measures our path and its raw baseline in the same run and prints the ratio.

Run them all with `python -m bench --models build/models` (`make bench`); results land in bench/results/.
"""

__all__ = ["BENCHMARKS", "MODULES"]

# name -> module under bench/ with run(options) -> Report (bench/results/<name>.json)
BENCHMARKS = (
    "inproc",
    "serving",
    "agent_footprint",
    "outbox_append",
    "uplink_e2e",
    "backlog_drain",
    "telemetry_ingest",
    "control_fanout",
    "download_resume",
    "shadow_overhead",
    "rollout",
    "compression",
)
# Benchmarks whose module is not named like the benchmark (bench/<module>.py); the rest: bench/<name>.py.
MODULES = {
    "control_fanout": "bench_control_fanout",
    "download_resume": "bench_download_resume",
    "rollout": "bench_rollout",
}
