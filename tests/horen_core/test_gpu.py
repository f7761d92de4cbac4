"""On a CUDA device: the codebook lives next to the model, edits and routing work there, and a codebook
saved on the GPU loads on the CPU into the same routing (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from horen_core import HorenConfig

pytestmark = pytest.mark.gpu

CFG = HorenConfig(layer=1, max_steps=20)
PROMPTS = ["the capital of France is", "who wrote a", "which river"]


def test_edit_and_route_on_cuda_then_load_on_cpu(tiny_factory, tiny_tokenizer, make_editor, tmp_path):
    gpu = make_editor(tiny_factory("llama").to("cuda"), tiny_tokenizer, CFG)
    assert gpu.codebook.keys.device.type == "cuda"
    res = gpu.edit(PROMPTS[0], "Rome")
    gpu.edit(PROMPTS[1], "Alice")
    assert res.value.device.type == "cpu"
    on_gpu = gpu.generate(PROMPTS, max_new_tokens=3)
    assert on_gpu[0].text.split()[0] == "Rome" and on_gpu[2].entry_id is None

    path = tmp_path / "codebook.safetensors"
    gpu.save(path)
    cpu = make_editor(tiny_factory("llama"), tiny_tokenizer, CFG)
    cpu.load(path)
    assert torch.equal(cpu.codebook.values, gpu.codebook.values.cpu())
    on_cpu = cpu.generate(PROMPTS, max_new_tokens=3)
    assert [(g.entry_id, g.edit_id) for g in on_cpu] == [(g.entry_id, g.edit_id) for g in on_gpu]
    assert on_cpu[0].token_ids[0] == on_gpu[0].token_ids[0]
