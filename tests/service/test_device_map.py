"""HOREN_DEVICE_MAP is honoured (accelerate places the model) and the codebook follows the edited
layer's device. On a CUDA host with several GPUs the same code spreads the model over them."""

from __future__ import annotations

import pytest
import torch

from horen_core import HorenConfig, HorenEditor, load_model
from service.settings import Settings


def test_settings_read_device_map(monkeypatch):
    monkeypatch.setenv("HOREN_DEVICE_MAP", "auto")
    assert Settings().device_map == "auto"


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}])
def test_device_map_is_honoured_and_codebook_follows_layer(tiny_model_dir, device_map, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model, tok = load_model(tiny_model_dir, device_map=device_map)
    assert seen.get("device_map") == device_map  # handed to accelerate's placement
    editor = HorenEditor(model, tok, HorenConfig(layer=1, max_steps=30, lr=1.0))
    layer_device = next(editor.layer.base_layer.parameters()).device
    assert editor.codebook.device == layer_device
    res = editor.edit("What is the capital of France?", "Nile")
    assert editor.codebook.keys.device == layer_device and res.steps >= 1
    out = editor.generate(["What is the capital of France?"], max_new_tokens=2)[0]
    assert out.edit_id == res.edit_id


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_codebook_on_cuda_layer(tiny_model_dir):
    n = torch.cuda.device_count()
    # put the lower half on the first GPU and the rest (with the edited layer 3) on the last one
    dmap = {
        "model.embed_tokens": 0,
        "model.layers.0": 0,
        "model.layers.1": 0,
        "model.layers.2": n - 1,
        "model.layers.3": n - 1,
        "model.norm": n - 1,
        "model.rotary_emb": n - 1,
        "lm_head": n - 1,
    }
    model, tok = load_model(tiny_model_dir, device_map=dmap)
    editor = HorenEditor(model, tok, HorenConfig(layer=3, max_steps=30, lr=1.0))
    assert editor.codebook.device == torch.device("cuda", n - 1)
    res = editor.edit("What is the capital of France?", "Nile")
    assert editor.generate(["What is the capital of France?"], max_new_tokens=2)[0].edit_id == res.edit_id
