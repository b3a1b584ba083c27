"""The device's side of the control plane beyond the transport: fetching and trusting model artifacts, and
keeping the desired state across restarts. The transports themselves live in edge_runtime/sync/."""

from __future__ import annotations

from edge_runtime.control.desired_store import DesiredStore
from edge_runtime.control.download import DownloadFailed, download_file
from edge_runtime.control.fetch import download_dir, fetch_package, remove_download
from edge_runtime.control.trust import ArtifactRefused, TrustStore

__all__ = [
    "ArtifactRefused",
    "DesiredStore",
    "DownloadFailed",
    "TrustStore",
    "download_dir",
    "download_file",
    "fetch_package",
    "remove_download",
]
