"""Checkpoints: where torchvision publishes them, downloading one with its hash checked, validating
a file against an architecture, and a model's memory size.

Nothing here knows about SDFS: callers (the CLI, the worker) pass URLs and local paths.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import torch
import torchvision

from . import registry

# torch.hub's own pattern for the hash prefix in a published file name ("alexnet-owt-7be5be79.pth").
HASH_REGEX = torch.hub.HASH_REGEX
_CHUNK = 1024 * 1024


class WeightsDownloadError(OSError):
    """The checkpoint could not be fetched (offline, refused, HTTP error, timed out)."""


class WeightsHashError(ValueError):
    """The downloaded bytes do not match the hash prefix in the file name."""


def default_url(name: str, mirror: str = "") -> str:
    """The published URL of a model's DEFAULT weights; with ``mirror``, the same file name under that base URL."""
    url = registry.default_weights(registry.resolve_name(name)).url
    if mirror:
        return mirror.rstrip("/") + "/" + os.path.basename(urllib.parse.urlparse(url).path)
    return url


def hash_prefix(url: str) -> str | None:
    """The sha256 prefix embedded in the URL's file name (as torch.hub reads it), or None if there is none."""
    match = HASH_REGEX.search(os.path.basename(urllib.parse.urlparse(url).path))
    return match.group(1) if match and match.group(1) else None


def download(url: str, dest: str | os.PathLike[str], timeout: float) -> str:
    """Download ``url`` to ``dest`` and return the sha256 of the bytes.

    The hash prefix in the file name is checked as ``torch.hub.download_url_to_file(hash_prefix=...)``
    does; we stream ourselves because that helper has no timeout, and an offline machine must fail
    at once. ``timeout`` bounds the connection and every read. Nothing is left at ``dest`` on failure.
    """
    expected = hash_prefix(url)
    dest = os.fspath(dest)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(dest)), prefix=".download-", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http(s) URL of weights
                    while chunk := resp.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            except urllib.error.HTTPError as exc:
                raise WeightsDownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            except (urllib.error.URLError, OSError) as exc:  # DNS failure, refused, timed out, reset
                reason = getattr(exc, "reason", exc)
                raise WeightsDownloadError(f"cannot download {url}: {reason}") from None
        got = digest.hexdigest()
        if expected is not None and not got.startswith(expected):
            raise WeightsHashError(f'{url}: invalid hash value (expected "{expected}", got "{got}")')
        os.replace(tmp, dest)
        return got
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class WeightsInfo:
    model: str
    tensors: int
    nbytes: int  # bytes of the tensors the model keeps (parameters and buffers)


def _meta_model(name: str) -> torch.nn.Module:
    # The meta device gives shapes without memory or init compute: ViT-H (2.5 GB) builds in ~50 ms.
    with torch.device("meta"):
        kwargs = registry.arch_kwargs(name, registry.default_weights(name))
        return torchvision.models.get_model(name, weights=None, **kwargs)


def validate(name: str, path: str | os.PathLike[str]) -> WeightsInfo:
    """Check that ``path`` loads as a state dict for model ``name`` (every key, every shape).

    Raises ValueError (or FileNotFoundError) with the reason. Uses the same reading and key
    normalisation as :class:`models.Classifier`, so a file that passes here loads on a worker.
    """
    from .predict import _read_state_dict  # noqa: PLC0415 - predict imports this module's helpers

    resolved = registry.resolve_name(name)
    state = _read_state_dict(resolved, os.fspath(path))
    model = _meta_model(resolved)
    try:
        # assign=True swaps the meta tensors for the file's: keys and shapes are checked, nothing is copied.
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{resolved}: weights in {path} do not fit this model: {exc}") from None
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    return WeightsInfo(resolved, len(tensors), sum(t.numel() * t.element_size() for t in tensors))


def module_nbytes(model: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@functools.cache
def model_nbytes(name: str) -> int:
    """Bytes a loaded ``name`` keeps (parameters and buffers), known before loading it."""
    return module_nbytes(_meta_model(registry.resolve_name(name)))
