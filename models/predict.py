"""Image decoding and top-k ImageNet classification with torchvision models."""

from __future__ import annotations

import io
import logging
import os
import threading
from typing import Any

import torch
import torchvision
from PIL import Image

from . import registry

log = logging.getLogger("idunno.models")

Prediction = list[tuple[str, float]]

# Raster formats a client may upload. Others are refused because some PIL
# plugins do risky things on untrusted input (EPS, for one, runs Ghostscript).
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


class ImageDecodeError(ValueError):
    """Raised when bytes cannot be decoded into an image."""


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image.

    Raises ImageDecodeError for empty, corrupt, truncated or oversized input
    (PIL's decompression-bomb limit, ``Image.MAX_IMAGE_PIXELS``) and for
    formats outside IMAGE_FORMATS.
    """
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            # open() is lazy; load() forces a full decode so truncation shows up here.
            img.load()
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large to decode safely: {exc}") from exc
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageDecodeError(f"cannot decode image ({len(data)} bytes): {exc}") from exc


def _read_state_dict(name: str, path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: weights file not found: {path}")
    try:
        # weights_only=True refuses arbitrary pickled objects in untrusted files.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict):
            raise TypeError(f"expected a dict, got {type(checkpoint).__name__}")
        return registry.normalize_state_dict(name, checkpoint)
    except Exception as exc:
        raise ValueError(f"{name}: cannot load weights from {path}: {exc}") from exc


NOOP_MODEL = "noop"


def is_noop(name: str) -> bool:
    """Whether ``name`` (as a user may spell it) is the :class:`NoopClassifier`."""
    return name.strip().lower() == NOOP_MODEL


class Classifier:
    """One torchvision ImageNet classifier with its matching preprocessing.

    Weights come from, in order: ``weights_path`` (a state_dict or a checkpoint
    with a "state_dict" key), the torch hub cache file of the model's DEFAULT
    weights, or seeded random init (deterministic, but predictions are not
    meaningful; a warning is logged). Nothing is ever downloaded. ``label`` names where
    ``weights_path`` came from (e.g. an SDFS file and version) in ``weights_source``.

    ``num_threads`` calls ``torch.set_num_threads``, which is process-wide: it
    affects every model in the process, not only this one.
    """

    decodes_input = True  # the worker hands it decoded PIL images

    def __init__(
        self,
        name: str,
        weights_path: str | None = None,
        num_threads: int | None = None,
        seed: int = 0,
        label: str | None = None,
    ) -> None:
        self.name = registry.resolve_name(name)
        weights = registry.default_weights(self.name)
        # transforms() and meta come from torchvision itself, so they work offline.
        self.transform = weights.transforms()
        self.categories: list[str] = list(weights.meta["categories"])
        if num_threads is not None:
            torch.set_num_threads(num_threads)

        kwargs = registry.arch_kwargs(self.name, weights)
        hub_path = registry.hub_cache_path(weights)
        if weights_path is not None:
            source = weights_path
        elif os.path.isfile(hub_path):
            source = hub_path
        else:
            source = None

        state = None if source is None else _read_state_dict(self.name, source)
        # Seeded even when weights follow, and fork_rng keeps the caller's global RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = torchvision.models.get_model(self.name, weights=None, **kwargs)
        if state is None:
            self.pretrained = False
            self.weights_source = f"random(seed={seed})"
            log.warning(
                "%s: no pretrained weights found (looked in %s); using seeded random weights "
                "(seed=%d) — predictions are not meaningful",
                self.name,
                hub_path,
                seed,
            )
        else:
            try:
                self.model.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(f"{self.name}: weights in {source} do not fit this model: {exc}") from exc
            self.pretrained = True
            origin = "file" if source == weights_path else "hub-cache"
            self.weights_source = label if label and source == weights_path else f"{origin}:{source}"

        self.model.eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.warm = False

    def warm_up(self) -> None:
        """Run one inference on a blank image, once. Torch's first forward pass on a new model
        allocates buffers and picks kernels (about 0.4-0.6 s extra for ResNet-50 on a busy 2-core
        machine); a worker preloading a model does this so the cost does not land on the first
        real query of the job that asked for the preload."""
        if not self.warm:
            self.predict_batch([Image.new("RGB", (256, 256))])
            self.warm = True

    def __repr__(self) -> str:
        return f"Classifier({self.name!r}, weights_source={self.weights_source!r})"

    def predict_batch(self, images: list[Image.Image], topk: int = 5) -> list[Prediction]:
        """Classify images; return per image the top-k (label, probability), most likely first."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not images:
            return []
        k = min(topk, len(self.categories))
        batch = torch.stack([self.transform(img.convert("RGB")) for img in images])
        with torch.inference_mode():
            logits = self.model(batch)
            probs = torch.softmax(logits.float(), dim=1)
            top_p, top_i = probs.topk(k, dim=1)
        return [
            [(self.categories[i], p) for i, p in zip(idx, ps, strict=True)]
            for idx, ps in zip(top_i.tolist(), top_p.tolist(), strict=True)
        ]

    def predict(self, image: Image.Image, topk: int = 5) -> Prediction:
        """Classify one image."""
        return self.predict_batch([image], topk)[0]


class NoopClassifier:
    """A model that computes nothing: every input gets the one label ``noop``.

    For measuring the cluster's own cost per query (dispatch, input fetch, results, statistics)
    without torch, as ``bench/throughput.py`` does. Inputs are not even decoded, so any bytes do.
    """

    name = NOOP_MODEL
    pretrained = False
    weights_source = "none"
    decodes_input = False
    categories = [NOOP_MODEL]

    def predict_batch(self, images: list[Any], topk: int = 5) -> list[Prediction]:
        return [[(NOOP_MODEL, 1.0)] for _ in images]

    def warm_up(self) -> None:
        """Nothing to warm."""

    def predict(self, image: Any, topk: int = 5) -> Prediction:
        return self.predict_batch([image], topk)[0]


_NOOP = NoopClassifier()
_cache: dict[tuple[str, str | None, int], Classifier] = {}
_cache_lock = threading.Lock()


def get_classifier(name: str, weights_path: str | None = None, **kwargs: Any) -> Classifier:
    """Return a shared Classifier, building it on first use.

    One instance per (model name, weights_path, seed); ``num_threads`` only
    applies when the instance is first built. ``noop`` gives the :class:`NoopClassifier`.
    """
    if is_noop(name):
        return _NOOP  # type: ignore[return-value] - same predict/predict_batch interface
    resolved = registry.resolve_name(name)
    path = os.path.abspath(weights_path) if weights_path is not None else None
    key = (resolved, path, int(kwargs.get("seed", 0)))
    # Held while building so concurrent callers never load the same model twice.
    with _cache_lock:
        clf = _cache.get(key)
        if clf is None:
            clf = Classifier(resolved, weights_path=path, **kwargs)
            _cache[key] = clf
        return clf


def clear_cache() -> None:
    """Drop all cached classifiers (mainly for tests)."""
    with _cache_lock:
        _cache.clear()


def _query_result(model: str, img: Image.Image, query_id: Any) -> dict[str, Any]:
    return {"query_id": query_id, "model": model, "top5": get_classifier(model).predict(img, topk=5)}


def alexnet_predict(img: Image.Image, query_id: Any) -> dict[str, Any]:
    """Original IDunno API: top-5 AlexNet labels for one image."""
    return _query_result("alexnet", img, query_id)


def resnet_predict(img: Image.Image, query_id: Any) -> dict[str, Any]:
    """Original IDunno API: top-5 ResNet-50 labels for one image."""
    return _query_result("resnet50", img, query_id)
