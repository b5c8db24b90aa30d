"""The errors of SDFS: the master's refusal of a request, and a client operation's failure."""

from __future__ import annotations


class MasterError(Exception):
    """A request the master refuses; ``code`` is the protocol error code sent back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SdfsError(RuntimeError):
    """A client operation that failed (also importable from sdfs.client, where callers expect it)."""

    def __init__(self, message: str, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt  # the replica answered with data that fails its checksum
