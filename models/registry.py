"""Model names, default weights and checkpoint handling for torchvision classifiers.

Everything here works offline: the weights enums carry their transforms and
ImageNet categories, and nothing is downloaded.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torchvision
from torchvision.models import WeightsEnum

from common.modelnames import ALIASES  # short names kept from the original IDunno API (one list)

# Old DenseNet checkpoints (the ones torchvision publishes) use "norm.1"-style
# keys that current module names cannot have; torchvision renames them on load.
_DENSENET_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)

# Auxiliary classifier heads are only used in training; published checkpoints
# contain them, but the inference models we build do not.
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


def list_models() -> list[str]:
    """Return the sorted names of all torchvision image-classification models."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def resolve_name(name: str) -> str:
    """Map a user-supplied model name or alias to a torchvision model name.

    Raises ValueError with close matches when the name is unknown.
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    available = list_models()
    if key in available:
        return key
    close = difflib.get_close_matches(key, available + list(ALIASES), n=5, cutoff=0.5)
    hint = f"; did you mean: {', '.join(close)}?" if close else "; see models.list_models()"
    raise ValueError(f"unknown model {name!r}{hint}")


def default_weights(name: str) -> WeightsEnum:
    """Return the DEFAULT weights entry (transforms, categories, URL) of a resolved model name."""
    return torchvision.models.get_model_weights(name).DEFAULT


def hub_cache_path(weights: WeightsEnum) -> str:
    """Where torch.hub would have stored the checkpoint for ``weights``."""
    filename = os.path.basename(weights.url)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def arch_kwargs(name: str, weights: WeightsEnum) -> dict[str, Any]:
    """Builder kwargs that make a ``weights=None`` model match the published checkpoint.

    torchvision's builders change these when given pretrained weights; we build
    with ``weights=None`` (never downloads), so we have to apply them ourselves.
    The same architecture is used for random init, so that the DEFAULT
    transforms fit every model and saved random weights load back.
    """
    if name in ("googlenet", "inception_v3"):
        # Checkpoints expect ImageNet-normalised input re-mapped inside the model.
        return {"transform_input": True, "aux_logits": False, "init_weights": False}
    if name.startswith("vit_"):
        # e.g. vit_h_14's DEFAULT weights are for 518x518 input, not 224.
        return {"image_size": weights.meta["min_size"][0]}
    if name == "maxvit_t":
        return {"input_size": weights.meta["min_size"]}
    return {}


def normalize_state_dict(name: str, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Turn a loaded checkpoint into a state_dict for the model built by ``arch_kwargs``.

    Accepts a plain state_dict or a training checkpoint with a "state_dict" key,
    strips DataParallel's "module." prefix, renames legacy DenseNet keys and drops
    auxiliary training heads. Keeps the per-module version metadata.
    """
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise TypeError("checkpoint is neither a state_dict nor a dict with a 'state_dict' entry")
    out: OrderedDict[str, Any] = OrderedDict()
    # load_state_dict reads module versions from this attribute; MNASNet refuses to load without it.
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            ("" if k == "module" else k.removeprefix("module."), v) for k, v in metadata.items()
        )
    elif name.startswith("mnasnet"):
        # Plain dicts carry no version; current torchvision builds and saves version 2.
        out._metadata = OrderedDict({"": {"version": 2}})  # type: ignore[attr-defined]
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(_AUX_PREFIXES):
            continue
        if name.startswith("densenet"):
            match = _DENSENET_LEGACY_KEY.match(key)
            if match:
                key = match.group(1) + match.group(2)
        out[key] = value
    return out
