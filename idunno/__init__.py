"""IDunno's Python client: ``from idunno import Client`` (see docs/client.md)."""

from idunno.client import (
    BadRequest,
    Client,
    ClusterUnavailable,
    CommandFailed,
    IdunnoError,
    Job,
    NotFound,
    Result,
    Sdfs,
    SdfsFailed,
    WaitTimeout,
)

__all__ = ["BadRequest", "Client", "ClusterUnavailable", "CommandFailed", "IdunnoError", "Job", "NotFound",
           "Result", "Sdfs", "SdfsFailed", "WaitTimeout"]
