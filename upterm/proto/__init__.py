"""Generated protobuf modules for the upstream payloads (see server.proto)."""
