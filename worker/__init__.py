"""The worker: runs inference tasks and serves SDFS storage."""
