"""IDunno model layer: torchvision ImageNet classifiers and image decoding.

Works fully offline: pretrained weights are used only if a checkpoint is given
or already in the torch hub cache; otherwise models get seeded random weights.
"""

from .predict import (
    IMAGE_FORMATS,
    NOOP_MODEL,
    Classifier,
    ImageDecodeError,
    NoopClassifier,
    Prediction,
    alexnet_predict,
    clear_cache,
    decode_image,
    get_classifier,
    is_noop,
    resnet_predict,
)
from .registry import ALIASES, list_models, resolve_name

__all__ = [
    "ALIASES",
    "IMAGE_FORMATS",
    "NOOP_MODEL",
    "Classifier",
    "ImageDecodeError",
    "NoopClassifier",
    "Prediction",
    "alexnet_predict",
    "clear_cache",
    "decode_image",
    "get_classifier",
    "is_noop",
    "list_models",
    "resnet_predict",
    "resolve_name",
]
