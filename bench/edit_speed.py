"""Edit speed, our way against the paper's, side by side in one run.

The same N sequential ZsRE edits are made twice on the same model: with ``HorenConfig()`` (fast path
above the edited layer, early stop) and with ``HorenConfig(reference_procedure=True, lr=1.0)`` (the
paper's public procedure: a fixed 50 full-model steps per edit, plain Adam). Each run gets a fresh editor. Both
are scored with ``horen_core.evaluate.score`` (rewrite / rephrase / locality, greedy and teacher
forced). Prints both score sets, median and p90 seconds per edit, a ``ratio`` line (reference median
/ ours median) and, last, a one-line JSON summary.

``--random-init llama-135m|llama3-8b`` times a randomly initialised model of those shapes instead
(e.g. on a GPU with ``--device cuda``); quality numbers are meaningless there and are not printed.

    .venv/bin/python bench/edit_speed.py --n 10
    .venv/bin/python bench/edit_speed.py --random-init llama3-8b --device cuda --n 20
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import add_model_arguments, apply_threads  # noqa: E402
from horen_core import HorenConfig, HorenEditor, load_model, pick_device  # noqa: E402
from horen_core.evaluate import edit_seconds_stats, load_records, locality_outputs, score, summarize  # noqa: E402

RANDOM_SHAPES = {
    # SmolLM2-135M: the bundled model's shapes, fp32 like the dequantised GGUF
    "llama-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        dtype=torch.float32,
    ),
    # Llama-3-8B in bf16
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype=torch.bfloat16,
    ),
}


class ClippedTokenizer:
    """A tokenizer whose ids are clipped into a smaller model's vocabulary (random-init timing only)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.inner, self.vocab_size = tokenizer, vocab_size
        self.pad_token_id = min(tokenizer.pad_token_id, vocab_size - 1)
        self.eos_token_id = min(tokenizer.eos_token_id, vocab_size - 1)

    def __call__(self, text, **kwargs):
        out = self.inner(text, **kwargs)
        out["input_ids"] = [min(i, self.vocab_size - 1) for i in out["input_ids"]]
        return out

    def decode(self, ids, **kwargs) -> str:
        return self.inner.decode(ids, **kwargs)

    def __len__(self) -> int:
        return self.vocab_size


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer built in code, when the bundled one is not installed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def bundled_tokenizer(converted_dir: Path):
    from transformers import AutoTokenizer

    for cfg in sorted(converted_dir.glob("*/tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(cfg.parent, local_files_only=True)
    try:
        from horen_core import default_model_path

        gguf = default_model_path()
    except Exception:
        return None
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def random_model(arch: str, device: torch.device, converted_dir: Path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    shapes = dict(RANDOM_SHAPES[arch])
    dtype = shapes.pop("dtype")
    tokenizer = bundled_tokenizer(converted_dir) or byte_tokenizer()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cfg = LlamaConfig(**shapes, pad_token_id=0, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    with device:  # initialise directly on the device: an 8B model never touches host memory
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if len(tokenizer) > cfg.vocab_size:
        tokenizer = ClippedTokenizer(tokenizer, cfg.vocab_size)
    return model, tokenizer


def bench_model(random_init: str | None, model: str | None, device: torch.device, converted_dir: str | Path):
    """(model, tokenizer): randomly initialised of the ``random_init`` shape, else the local
    ``model`` (default: the bundled SmolLM2)."""
    if random_init:
        return random_model(random_init, device, Path(converted_dir))
    return load_model(model, device=device, converted_dir=converted_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--data", default=str(REPO / "tests" / "fixtures" / "zsre_small.json"), help="ZsRE MEND json")
    add_model_arguments(p)
    p.add_argument("--random-init", choices=sorted(RANDOM_SHAPES), default=None)
    args = p.parse_args(argv)
    apply_threads(args)

    device = pick_device(args.device)
    records = load_records(args.data, n=args.n, offset=args.offset)
    t0 = time.perf_counter()
    model, tokenizer = bench_model(args.random_init, args.model, device, args.converted_dir)
    quality = args.random_init is None
    what = args.random_init or args.model or "bundled SmolLM2-135M-Instruct"
    print(f"model: {what} on {device} ({time.perf_counter() - t0:.1f} s to load), {len(records)} edits")
    if device.type == "cpu":
        print(f"torch threads: {torch.get_num_threads()}")

    # the paper's optimiser is plain Adam (betas 0.9/0.999); from_dict drops the betas on a HorenConfig
    # that has no such fields, so this stays HorenConfig(reference_procedure=True, lr=1.0) there
    reference = HorenConfig.from_dict({"reference_procedure": True, "lr": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999})
    modes = {"ours": HorenConfig(), "reference": reference}
    # one editor per mode, each on its own copy of the model, and the two modes' edits interleaved
    # record by record (the first mode alternating), so load from anything else hits both alike
    copies = [model] + [copy.deepcopy(model) for _ in range(len(modes) - 1)]  # copied before any is wrapped
    editors = {name: HorenEditor(m, tokenizer, cfg) for m, (name, cfg) in zip(copies, modes.items())}
    with editors["ours"].unedited():
        baseline_loc = locality_outputs(editors["ours"], records) if quality else None
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    steps: dict[str, list[int]] = {name: [] for name in modes}
    order = list(modes)
    try:
        for name in order:  # warm-up, one throwaway edit per mode
            editor = editors[name]
            editor.rollback(editor.edit("Warm-up: which city is the capital of the country?", "Nowhere").edit_id)
        for i, rec in enumerate(records):
            for name in order if i % 2 == 0 else order[::-1]:
                res = editors[name].edit(rec.prompt, rec.target)
                seconds[name].append(res.seconds)
                steps[name].append(res.steps)
        results = {}
        for name in order:
            editor = editors[name]
            out = {
                **edit_seconds_stats(seconds[name]),
                "mean_steps": round(statistics.mean(steps[name]), 2),
                "keys": len(editor.codebook),
            }
            if quality:
                out.update(summarize(score(editor, records, baseline_loc)))
            results[name] = out
            print(f"{name:9s} {json.dumps(out)}")
    finally:
        for editor in editors.values():
            editor.unwrap()

    ours, ref = results["ours"], results["reference"]
    ratio = ref["edit_seconds_median"] / ours["edit_seconds_median"]
    print(
        f"median s/edit: ours {ours['edit_seconds_median']:.3f}  reference {ref['edit_seconds_median']:.3f}; "
        f"p90: ours {ours['edit_seconds_p90']:.3f}  reference {ref['edit_seconds_p90']:.3f}"
    )
    print(f"ratio (reference median / ours median): {ratio:.2f}")
    summary = {
        "model": what,
        "device": str(device),
        "n": len(records),
        "ratio": round(ratio, 3),
        "ours": ours,
        "reference": ref,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
