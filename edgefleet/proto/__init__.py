"""Generated protobuf and gRPC code for protos/ (do not edit; run protos/generate.py)."""
