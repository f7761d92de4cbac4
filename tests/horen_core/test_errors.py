"""Bad inputs and bad configuration raise horen_core's typed errors, and leave the editor unchanged."""

from __future__ import annotations

import pytest

from horen_core import (
    ConfigError,
    CorruptStateError,
    HorenConfig,
    HorenEditor,
    HorenError,
    InvalidInputError,
    UnknownEditError,
    UnsupportedModelError,
)

CFG = HorenConfig(layer=1, max_steps=5)


@pytest.fixture
def editor(tiny_llama, make_editor):
    return make_editor(*tiny_llama, CFG)


def test_errors_are_typed():
    for err in (InvalidInputError, ConfigError, CorruptStateError, UnknownEditError, UnsupportedModelError):
        assert issubclass(err, HorenError)
    assert issubclass(InvalidInputError, ValueError) and issubclass(UnknownEditError, KeyError)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", None, 42])
def test_empty_or_non_string_prompt(editor, prompt):
    with pytest.raises(InvalidInputError):
        editor.edit(prompt, "Rome")
    with pytest.raises(InvalidInputError):
        editor.generate([prompt])
    assert len(editor.codebook) == 0


@pytest.mark.parametrize("target", ["", "  ", None])
def test_empty_target(editor, target):
    with pytest.raises(InvalidInputError):
        editor.edit("the capital of France is", target)
    assert len(editor.codebook) == 0


def test_prompt_longer_than_context(editor):
    assert editor.max_context == 64
    too_long = " ".join(["the"] * (editor.max_context + 1))
    with pytest.raises(InvalidInputError):
        editor.edit(too_long, "Rome")
    with pytest.raises(InvalidInputError):
        editor.generate([too_long], max_new_tokens=1)
    assert len(editor.codebook) == 0


def test_prompt_plus_target_or_new_tokens_beyond_context(editor):
    prompt = " ".join(["the"] * (editor.max_context - 2))
    editor.generate([prompt], max_new_tokens=2)  # exactly fits
    with pytest.raises(InvalidInputError):
        editor.generate([prompt], max_new_tokens=3)
    with pytest.raises(InvalidInputError):
        editor.edit(prompt, "Rome Oslo Lima")
    assert len(editor.codebook) == 0


def test_one_bad_prompt_fails_the_whole_batch(editor):
    with pytest.raises(InvalidInputError):
        editor.generate(["who wrote", ""])


def test_rollback_unknown_edit(editor):
    with pytest.raises(UnknownEditError):
        editor.rollback(123)


def test_edit_id_already_in_use(editor):
    res = editor.edit("who wrote", "Alice")
    with pytest.raises(InvalidInputError):
        editor.edit("Alice plays", "chess", edit_id=res.edit_id)
    assert len(editor.codebook) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"query_strategy": "first_token"},
        {"query_fraction": 0.0},
        {"query_fraction": 1.5},
        {"hopfield_alpha": -0.1},
        {"hopfield_alpha": 1.1},
        {"hopfield_steps": -1},
        {"max_steps": 0},
        {"threshold": 1.5},
        {"threshold": -2.0},
        {"repeat_guard": 1},
        {"repeat_guard": -1},
    ],
)
def test_bad_config_raises_config_error(tiny_llama, bad):
    with pytest.raises(ConfigError):
        HorenConfig(**{"layer": 1, **bad}).validate()
    model, tok = tiny_llama
    with pytest.raises(ConfigError):
        HorenEditor(model, tok, HorenConfig(**{"layer": 1, **bad}))
    assert type(model.get_submodule("model.layers.1.mlp.down_proj")).__name__ != "HorenLayer"


def test_config_round_trips_through_dict():
    cfg = HorenConfig(layer=3, threshold=0.7, reference_procedure=True)
    assert HorenConfig.from_dict({**cfg.to_dict(), "unknown_field": 1}) == cfg


@pytest.mark.parametrize("layer", [4, -5, 100])
def test_layer_out_of_range(tiny_llama, layer):
    with pytest.raises(UnsupportedModelError):
        HorenEditor(*tiny_llama, HorenConfig(layer=layer))


def test_unknown_module_template(tiny_llama):
    with pytest.raises(UnsupportedModelError):
        HorenEditor(*tiny_llama, HorenConfig(layer=1, module_template="model.layers.{layer}.mlp.nope"))


def test_wrapping_twice_is_refused(tiny_llama, make_editor):
    make_editor(*tiny_llama, CFG)
    with pytest.raises(HorenError):
        HorenEditor(*tiny_llama, CFG)
