"""The device's links to the cloud beside the inference API: `mqtt` (telemetry, presence and desired-state
subscriptions over MQTT 5) and `uplink` (results streamed to cloud-sync over gRPC)."""
