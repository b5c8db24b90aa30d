"""Model names the cluster serves, known without importing torch (the coordinator never loads one).

``MODEL_NAMES`` is torchvision's ImageNet classifiers (``torchvision.models.list_models(module=
torchvision.models)`` of the pinned torchvision) plus ``noop``. It is a static list because the
coordinator (``broker/``) builds on ``common/`` and ``sdfs/`` only and must stay torch-free;
``tests/test_models.py`` checks it against torchvision's own registry, so an upgrade that adds or
drops a model fails the tests instead of drifting. ``models.registry`` uses the same aliases.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection

NOOP = "noop"  # labels every input "noop": the cluster's own cost per query (models.NoopClassifier)

# Short names kept from the original IDunno API.
ALIASES: dict[str, str] = {"resnet": "resnet50"}

TORCHVISION_CLASSIFIERS: frozenset[str] = frozenset({
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121",
    "densenet161", "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
    "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large",
    "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf",
    "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101",
    "resnet152", "resnet18", "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0",
    "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn",
    "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14",
    "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2"
})

MODEL_NAMES: frozenset[str] = TORCHVISION_CLASSIFIERS | {NOOP}


def is_noop(name: str) -> bool:
    """Whether ``name`` (as a user may spell it) is the noop model."""
    return name.strip().lower() == NOOP


def resolve_model(name: str, known: Collection[str] = MODEL_NAMES) -> str:
    """The canonical name of a model as a user may spell it (case, spaces, aliases).

    Raises ValueError naming close matches (difflib) when it is not a model of ``known``.
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in known:
        return key
    choices = sorted({*known, *(a for a, target in ALIASES.items() if target in known)})
    close = difflib.get_close_matches(key, choices, n=5, cutoff=0.6)
    hint = (f"; did you mean: {', '.join(close)}?" if close
            else "; use a torchvision classifier (alexnet, resnet50, ...) or noop")
    raise ValueError(f"unknown model {name!r:.80}{hint}")
