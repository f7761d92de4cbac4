"""HoReN: normalised Hopfield retrieval over a key-value codebook wrapped around one MLP
down-projection, for large-scale sequential model editing. Torch + transformers only.

The method in short: a prompt's query is the unit mean of the edited layer's input over its
question (the plain prompt, or the last user message of a chat-formatted one); a few damped
Hopfield steps over its nearest keys refine it; if the best key's cosine clears the threshold, and
the prompt names the edit's subject and asks its relation (a fitted relation gate over the same
layer input, where the model has one), that entry's value is added to the layer's output at the
question's last token. Each edit trains one value so the target is decoded in the plain and the
chat context alike, and a routed answer is handed to the unedited model once it has stated the
target (a word may not complete a run of tokens the answer already holds). An edit whose answer is a paragraph also trains a value for each of the answer's tokens
(its trail), added at that token while the text still follows the answer."""

from horen_core.codebook import Codebook, CodebookChange
from horen_core.config import HorenConfig
from horen_core.editor import EditResult, Fact, Generation, HorenEditor, TrainedEdit
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
    "Fact",
    "Generation",
    "HopfieldRetriever",
    "HorenConfig",
    "HorenEditor",
    "HorenError",
    "InvalidInputError",
    "TrainedEdit",
    "UnknownEditError",
    "UnsupportedModelError",
    "default_model_path",
    "load_model",
    "model_fingerprint",
    "pick_device",
]
