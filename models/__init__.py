"""IDunno model layer: torchvision ImageNet classifiers and image decoding.

Works fully offline: pretrained weights are used only if a checkpoint is given
or already in the torch hub cache; otherwise models get seeded random weights.
``download`` fetches a published checkpoint (hash checked) for the CLI's ``models pull``.
"""

from .cache import ModelCache, ModelTooLarge, NoRoom
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
from .weights import (
    WeightsDownloadError,
    WeightsHashError,
    WeightsInfo,
    default_url,
    download,
    hash_prefix,
    model_nbytes,
    validate,
)

__all__ = [
    "ALIASES",
    "IMAGE_FORMATS",
    "NOOP_MODEL",
    "Classifier",
    "ImageDecodeError",
    "ModelCache",
    "ModelTooLarge",
    "NoRoom",
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
    "validate",
    "WeightsDownloadError",
    "WeightsHashError",
    "WeightsInfo",
    "default_url",
    "download",
    "hash_prefix",
    "model_nbytes",
]
