"""The adaptive dynamic batcher: pure planning (policy), measurement (profiler), execution (batcher)."""
