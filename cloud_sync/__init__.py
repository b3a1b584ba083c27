"""cloud-sync: the fleet's cloud side (device registry, result ingest, rollouts) and fleetctl."""

__all__: list[str] = []
