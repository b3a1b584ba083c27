"""The model registry and artifact plane: content-addressed blobs, signed manifests, device downloads.

    blobs = DirectoryBlobStore(data_dir / "blobs")
    registry = ModelRegistry(db, blobs, FleetSigner.open(data_dir / "fleet-signing.key"))
    registry.register(manifest, expires_at_ms)        # after the blobs are uploaded

Served to operators by cloud_sync/api_models.py and to devices by artifacts.py (edgefleet.v1.Artifacts).
"""

from __future__ import annotations

from cloud_sync.registry.blobs import BlobInfo, BlobStore, DirectoryBlobStore
from cloud_sync.registry.signer import FleetSigner
from cloud_sync.registry.store import ModelRegistry, ModelVersion

__all__ = ["BlobInfo", "BlobStore", "DirectoryBlobStore", "FleetSigner", "ModelRegistry", "ModelVersion"]
