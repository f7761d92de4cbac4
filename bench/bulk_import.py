"""Bulk import throughput: the same N edits made one by one and batched, in one run.

One by one is ``HorenEditor.edit`` per fact; batched is ``HorenEditor.edit_many``, i.e.
``train_many`` of up to ``--batch`` facts (their values trained together) with each result applied
in order before the next call, as a bulk import makes them. Each way has its own editor on its own
copy of the model; the two are interleaved chunk by chunk (the first way alternating) so load from
anything else on the machine hits both alike, after one warm-up each. Both are scored with the same
``horen_core.evaluate.score`` call. Prints edits/s of each, the ratio (batched over one by one), both
score sets and, last, a one-line JSON summary.

``--data`` is a JSON file ``horen_core.evaluate.load_records`` reads (ZsRE MEND, CounterFact,
KnowEdit, UnKE) or a TSV of ``prompt<TAB>target`` lines (the default, ZsRE train pairs: only
rewrite accuracy is scored there, as the pairs have no rephrase or locality prompts).

    .venv/bin/python bench/bulk_import.py --n 40
    .venv/bin/python bench/bulk_import.py --n 1000 --batch 32 --device cuda
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
from horen_core import Fact, HorenConfig, HorenEditor, InvalidInputError, load_model, pick_device  # noqa: E402
from horen_core.evaluate import EditRecord, load_records, locality_outputs, score, summarize  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "zsre" / "zsre_mend_train_en_10000.tsv"


def read_records(path: str | Path, n: int, offset: int) -> list[EditRecord]:
    """``n`` records from ``offset``: a ``load_records`` JSON file, or prompt<TAB>target lines
    (those with an empty prompt or target skipped)."""
    path = Path(path)
    if path.suffix != ".tsv":
        return load_records(path, n=n, offset=offset)
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if i < offset or not line.strip():
            continue
        prompt, target = (line.split("\t") + [""])[:2]
        if not prompt.strip() or not target.strip():
            continue  # an empty prompt or target: not an edit (load_records refuses such records too)
        out.append(EditRecord(prompt.strip(), target.strip(), None, None, None))
        if len(out) == n:
            break
    return out


def outline(results: list) -> list[tuple[int, bool, int] | None]:
    """Each edit as (position of the edit that created its entry, created, steps), None where it
    was refused: comparable between editors whose entry ids differ (their warm-ups did)."""
    first: dict[int, int] = {}
    out = []
    for i, r in enumerate(results):
        if isinstance(r, InvalidInputError):
            out.append(None)
            continue
        out.append((first.setdefault(r.entry_id, i), r.created, r.steps))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32, help="facts per train_many call")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="load_records JSON, or prompt<TAB>target TSV")
    add_model_arguments(p)
    args = p.parse_args(argv)
    apply_threads(args)

    device = pick_device(args.device)
    records = read_records(args.data, args.n, args.offset)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, device=device, converted_dir=args.converted_dir)
    what = args.model or "bundled SmolLM2-135M-Instruct"
    print(f"model: {what} on {device} ({time.perf_counter() - t0:.1f} s to load), {len(records)} edits")
    print(f"data: {args.data} from {args.offset}; batch {args.batch}")
    if device.type == "cpu":
        print(f"torch threads: {torch.get_num_threads()}")

    twin = copy.deepcopy(model)  # before an editor wraps the model
    editors = {
        "one_by_one": HorenEditor(model, tokenizer, HorenConfig()),
        "batched": HorenEditor(twin, tokenizer, HorenConfig()),
    }
    one, many = editors["one_by_one"], editors["batched"]
    facts = [Fact(r.prompt, r.target) for r in records]
    seconds = {name: 0.0 for name in editors}
    results: dict[str, list] = {name: [] for name in editors}
    try:
        with one.unedited():
            baseline_loc = locality_outputs(one, records)
        # warm-up, thrown away: the fast path's once-per-model checks run here, not in the timing
        one.rollback(one.edit("Warm-up: which city is the capital of the country?", "Nowhere").edit_id)
        warm = [Fact("Warm-up: which city is the capital of the country?", "Nowhere"), Fact("Warm-up: who?", "Nobody")]
        for r in many.edit_many(warm):
            many.rollback(r.edit_id)

        def run(name: str, chunk: list[Fact]) -> None:
            start = time.perf_counter()
            if name == "one_by_one":
                made = []
                for f in chunk:
                    try:
                        made.append(one.edit(f.prompt, f.target))
                    except InvalidInputError as exc:
                        made.append(exc)
            else:
                made = many.edit_many(chunk, batch=args.batch)
            seconds[name] += time.perf_counter() - start
            results[name].extend(made)

        order = list(editors)
        for c, i in enumerate(range(0, len(facts), args.batch)):
            for name in order if c % 2 == 0 else order[::-1]:
                run(name, facts[i : i + args.batch])

        out = {}
        for name, editor in editors.items():
            made = [r for r in results[name] if not isinstance(r, InvalidInputError)]
            out[name] = {
                "edits_per_s": round(len(facts) / seconds[name], 3),
                "seconds": round(seconds[name], 2),
                "refused": len(facts) - len(made),
                "mean_steps": round(statistics.mean(r.steps for r in made), 2) if made else None,
                "keys": len(editor.codebook),
                **summarize(score(editor, records, baseline_loc)),
            }
            print(f"{name:10s} {json.dumps(out[name])}")
        one_out, many_out = outline(results["one_by_one"]), outline(results["batched"])
        created = sum(o is not None and o[1] for o in one_out)
        same = sum(a is not None and a == b for a, b in zip(one_out, many_out))
    finally:
        for editor in editors.values():
            editor.unwrap()

    ratio = out["batched"]["edits_per_s"] / out["one_by_one"]["edits_per_s"]
    print(
        f"edits/s: one by one {out['one_by_one']['edits_per_s']:.2f}, batched {out['batched']['edits_per_s']:.2f}; "
        f"{same}/{len(facts)} edits with the same entry, created flag and steps ({created} new keys one by one)"
    )
    print(f"ratio (batched / one by one edits/s): {ratio:.2f}")
    summary = {
        "model": what,
        "device": str(device),
        "data": str(args.data),
        "n": len(records),
        "batch": args.batch,
        "ratio": round(ratio, 3),
        "same_entry_and_steps": same,
        **out,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
