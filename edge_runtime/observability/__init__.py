"""Observability: Prometheus metrics (metrics.py; dataplane.py, states.py) and structured JSON logs.

Every in-process use of edge_runtime imports this package (the model repository tracks its metrics here), so
this is where the library's logging default is set: events go to the `logging` module and print nothing
unless the application asks (edgefleet.logs.use_library_logging); `edge-agent` replaces it with JSON lines.
"""

from edgefleet.logs import use_library_logging

use_library_logging()
