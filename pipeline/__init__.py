"""Control plane of the faster-qat study pipeline (never imports torch)."""
