"""The device's links to the cloud beside the inference API: the control transport (`control`: telemetry,
presence, desired and reported state, over MQTT 5 in `mqtt` or a gRPC stream in `grpc_control`) and `uplink`
(results streamed to cloud-sync over gRPC)."""
