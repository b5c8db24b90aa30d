"""The error the SDFS master answers a client request with (shared by every part of the master)."""

from __future__ import annotations


class MasterError(Exception):
    """A request the master refuses; ``code`` is the protocol error code sent back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
