"""Generated gRPC modules (compiled from proto/overlay/v1 at build time)."""
