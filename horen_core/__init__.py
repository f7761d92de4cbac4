"""HoReN: normalised Hopfield retrieval over a key-value codebook wrapped around one MLP
down-projection, for large-scale sequential model editing. Torch + transformers only."""

from horen_core.codebook import Codebook, CodebookChange
from horen_core.config import HorenConfig
from horen_core.editor import EditResult, Generation, HorenEditor
from horen_core.errors import (
    ConfigError,
    CorruptStateError,
    HorenError,
    InvalidInputError,
    UnknownEditError,
    UnsupportedModelError,
)
from horen_core.modeling import default_model_path, load_model, model_fingerprint, pick_device
from horen_core.retrieval import HopfieldRetriever

__all__ = [
    "Codebook",
    "CodebookChange",
    "ConfigError",
    "CorruptStateError",
    "EditResult",
    "Generation",
    "HopfieldRetriever",
    "HorenConfig",
    "HorenEditor",
    "HorenError",
    "InvalidInputError",
    "UnknownEditError",
    "UnsupportedModelError",
    "default_model_path",
    "load_model",
    "model_fingerprint",
    "pick_device",
]
