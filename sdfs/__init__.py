"""SDFS: a small replicated, versioned file store (metadata master + per-node replica storage)."""
