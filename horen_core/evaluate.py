"""Sequential-editing evaluation: load ZsRE (MEND format) or CounterFact (EasyEdit format) records,
make N edits in order, then score all of them the way the paper's code scores HoReN."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from horen_core.editor import HorenEditor


@dataclass(frozen=True)
class EditRecord:
    prompt: str
    target: str
    rephrase: str | None
    loc_prompt: str | None
    loc_answer: str | None


def detect_format(rows: list[dict]) -> str:
    first = rows[0] if rows else {}
    if "src" in first:
        return "zsre"
    if "target_new" in first:
        return "counterfact"
    raise ValueError("unknown data format: expected ZsRE MEND fields (src, ...) or CounterFact (prompt, target_new)")


def load_records(
    path: str | Path, fmt: str = "auto", target_field: str = "answers", n: int | None = None, offset: int = 0
) -> list[EditRecord]:
    rows = json.loads(Path(path).read_text())
    if fmt == "auto":
        fmt = detect_format(rows)
    rows = rows[offset : offset + n if n is not None else None]
    out = []
    for r in rows:
        if fmt == "zsre":
            target = r["answers"][0] if target_field == "answers" else r[target_field]
            out.append(EditRecord(r["src"], target, r.get("rephrase"), r.get("loc"), r.get("loc_ans")))
        elif fmt == "counterfact":
            target = r["target_new"] if target_field == "answers" else r[target_field]
            out.append(
                EditRecord(
                    r["prompt"],
                    target,
                    r.get("rephrase_prompt"),
                    r.get("locality_prompt"),
                    r.get("locality_ground_truth"),
                )
            )
        else:
            raise ValueError(f"unknown format {fmt!r}")
    return out


def _batches(items: Sequence[int], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def greedy_match(
    editor: HorenEditor, prompts: Sequence[str], targets: Sequence[list[int]], edited: bool = True, batch_size: int = 8
) -> list[float]:
    """Fraction of target tokens reproduced by greedy generation of len(target) tokens."""
    scores = [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for chunk in _batches(order, batch_size):
        n = max(len(targets[i]) for i in chunk)
        seqs = [editor.encode_prompt(prompts[i], reserve=n) for i in chunk]
        gens = _raw_greedy(editor, seqs, n, edited)
        for i, toks in zip(chunk, gens):
            t = targets[i]
            scores[i] = sum(int(a == b) for a, b in zip(toks[: len(t)], t)) / len(t)
    return scores


@torch.no_grad()
def _raw_greedy(editor: HorenEditor, seqs: list[list[int]], n: int, edited: bool) -> list[list[int]]:
    from horen_core.layer import activate

    ids, mask = editor._pad_left(seqs)
    kwargs = {
        "max_new_tokens": n,
        "min_new_tokens": n,
        "do_sample": False,
        "pad_token_id": editor.tokenizer.pad_token_id,
    }
    with editor.lock:
        if edited:
            with activate(editor._route_plan(mask)):
                out = editor.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            out = editor.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out[:, ids.shape[1] :].tolist()


def teacher_forced(
    editor: HorenEditor, prompts: Sequence[str], targets: Sequence[list[int]], batch_size: int = 8
) -> list[float]:
    """Fraction of target tokens that are the argmax given the true prefix."""
    scores = [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for chunk in _batches(order, batch_size):
        pids = [editor.encode_prompt(prompts[i], reserve=len(targets[i])) for i in chunk]
        seqs = [p + targets[i][:-1] for p, i in zip(pids, chunk)]
        keep = max(len(targets[i]) for i in chunk)
        logits, mask, _ = editor.forward_logits(seqs, [len(p) for p in pids], keep_last=keep)
        for row, i in enumerate(chunk):
            m = len(targets[i])  # the last m positions predict the target tokens (left padding)
            pred = logits[row, keep - m :].argmax(-1).tolist()
            scores[i] = sum(int(a == b) for a, b in zip(pred, targets[i])) / len(targets[i])
    return scores


def locality_outputs(editor: HorenEditor, records: Sequence[EditRecord], edited: bool) -> list[list[int] | None]:
    idx = [i for i, r in enumerate(records) if r.loc_prompt]
    outs: list[list[int] | None] = [None] * len(records)
    order = sorted(idx, key=lambda i: len(records[i].loc_prompt))
    for chunk in _batches(order, 8):
        lens = [len(editor.encode_target(records[i].loc_answer or "x")) for i in chunk]
        n = max(lens)
        seqs = [editor.encode_prompt(records[i].loc_prompt, reserve=n) for i in chunk]
        gens = _raw_greedy(editor, seqs, n, edited)
        for i, g, k in zip(chunk, gens, lens):
            outs[i] = g[:k]
    return outs


def score(editor: HorenEditor, records: Sequence[EditRecord], baseline_loc: Sequence[list[int] | None]) -> list[dict]:
    targets = [editor.encode_target(r.target) for r in records]
    prompts = [r.prompt for r in records]
    reph_idx = [i for i, r in enumerate(records) if r.rephrase]
    reph_prompts = [records[i].rephrase for i in reph_idx]
    reph_targets = [targets[i] for i in reph_idx]
    rw = greedy_match(editor, prompts, targets)
    rw_tf = teacher_forced(editor, prompts, targets)
    rp = greedy_match(editor, reph_prompts, reph_targets) if reph_idx else []
    rp_tf = teacher_forced(editor, reph_prompts, reph_targets) if reph_idx else []
    loc_now = locality_outputs(editor, records, edited=True)
    out = []
    reph = dict(zip(reph_idx, zip(rp, rp_tf)))
    for i, r in enumerate(records):
        row = {"prompt": r.prompt, "target": r.target, "rewrite_acc": rw[i], "rewrite_acc_tf": rw_tf[i]}
        if i in reph:
            row["rephrase_acc"], row["rephrase_acc_tf"] = reph[i]
        if baseline_loc[i] is not None:
            row["locality"] = float(loc_now[i] == baseline_loc[i])
        out.append(row)
    return out


def summarize(rows: list[dict]) -> dict:
    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return round(sum(vals) / len(vals), 4) if vals else None

    return {k: mean(k) for k in ("rewrite_acc", "rephrase_acc", "locality", "rewrite_acc_tf", "rephrase_acc_tf")}


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def edit_seconds_stats(seconds: Sequence[float]) -> dict:
    return {
        "edit_seconds_median": round(statistics.median(seconds), 4) if seconds else None,
        "edit_seconds_p90": round(percentile(seconds, 0.9), 4) if seconds else None,
    }
