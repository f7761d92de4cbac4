"""`horen eval`: N sequential edits from a data file, then score all N (and at checkpoints)."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from horen_core.config import HorenConfig
from horen_core.editor import HorenEditor
from horen_core.evaluate import (
    FORMATS,
    chat_prompt,
    edit_seconds_stats,
    load_records,
    locality_outputs,
    score,
    summarize,
    summarize_user,
    user_baseline,
    user_scores,
)
from horen_core.modeling import load_model
from horen_core.plotting import plot_checkpoints


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    d = HorenConfig()
    p.add_argument(
        "--data",
        required=True,
        help="ZsRE (MEND), CounterFact (EasyEdit or ROME), KnowEdit (EasyEdit) or UnKE JSON file",
    )
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    p.add_argument("--chat", action="store_true", help="also score every prompt in the model's chat template")
    p.add_argument(
        "--given-subjects",
        action="store_true",
        help="edit with the subject each record names (as a client passing `subject` would); default: inferred",
    )
    p.add_argument("--edit-chat", action="store_true", help="make the edits with the prompts in the chat template")
    p.add_argument("--no-user-metrics", action="store_true", help="only the paper's token-match metrics")
    p.add_argument("--target-field", default="answers", help="ZsRE: answers (answers[0]) or alt")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument(
        "--checkpoints", default="", help="comma-separated edit counts at which to re-score all edits so far"
    )
    p.add_argument("--model", default=None, help="local HF folder or GGUF file (default: bundled SmolLM2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", default="horen_eval_results.json")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw the metrics of --checkpoints against the edits")
    p.add_argument("--reference-procedure", action="store_true", help="the paper's 50 full-model steps per edit")
    p.add_argument(
        "--converted-dir",
        default=str(Path.home() / ".cache" / "horen" / "converted"),
        help="cache folder for a dequantised copy of a GGUF model ('' to dequantise in process every time)",
    )
    for name, value in d.to_dict().items():
        if name in ("reference_procedure", "module_template"):
            continue
        if isinstance(value, bool):
            p.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value)
        else:  # the only field without a default value is a float (gate_threshold)
            p.add_argument(f"--{name.replace('_', '-')}", type=float if value is None else type(value), default=value)
    p.add_argument("--module-template", default=None)


def config_from_args(args: argparse.Namespace) -> HorenConfig:
    data = {k: getattr(args, k) for k in HorenConfig().to_dict() if hasattr(args, k)}
    data["reference_procedure"] = args.reference_procedure
    return HorenConfig.from_dict(data)


def peak_memory_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        rss += torch.cuda.max_memory_allocated() / 2**20
    return round(rss, 1)


def run_eval(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    try:
        records = load_records(args.data, args.format, args.target_field, args.n, args.offset)
    except (OSError, ValueError) as exc:  # a missing file or a bad record: one line, not a traceback
        raise SystemExit(f"horen eval: {exc}") from None
    model, tokenizer = load_model(args.model, device=args.device, converted_dir=args.converted_dir or None)
    editor = HorenEditor(model, tokenizer, config_from_args(args))
    with editor.unedited():
        baseline_loc = locality_outputs(editor, records)
    user = not args.no_user_metrics
    chat = (args.chat or args.edit_chat) and editor.chat.available
    base_user = user_baseline(editor, records, chat) if user else None
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if c.strip()})
    seconds, steps, created = [], [], 0
    report: dict = {"config": editor.config.to_dict(), "checkpoints": {}}
    for i, rec in enumerate(tqdm(records, desc="editing", file=sys.stderr), start=1):
        prompt = chat_prompt(editor, rec.prompt) if args.edit_chat else rec.prompt
        res = editor.edit(prompt, rec.target, subject=rec.subject if args.given_subjects else None)
        seconds.append(res.seconds)
        steps.append(res.steps)
        created += int(res.created)
        if i in checkpoints and i < len(records):
            summary = summarize(score(editor, records[:i], baseline_loc[:i]))
            if user:
                done = records[:i]
                base_i = _head(base_user, done)
                summary |= summarize_user(user_scores(editor, done, base_i, chat), base_i)
            report["checkpoints"][str(i)] = {"n": i, **summary, "keys": len(editor.codebook)}
            print(json.dumps({"checkpoint": i, **summary}), file=sys.stderr)
    t0 = time.perf_counter()
    rows = score(editor, records, baseline_loc)
    user_summary = {}
    if user:
        urows = user_scores(editor, records, base_user, chat)
        for row, extra in zip(rows, urows):
            row.update(extra)
        user_summary = summarize_user(urows, base_user)
    for row, s, st in zip(rows, seconds, steps):
        row["edit_seconds"] = round(s, 4)
        row["steps"] = st
    summary = {
        "n": len(records),
        **summarize(rows),
        **user_summary,
        **edit_seconds_stats(seconds),
        "mean_steps": round(sum(steps) / max(len(steps), 1), 2),
        "keys": len(editor.codebook),
        "peak_memory_mb": peak_memory_mb(),
        "score_seconds": round(time.perf_counter() - t0, 1),
        "reference_procedure": bool(args.reference_procedure),
    }
    report["summary"] = summary
    report["records"] = rows
    Path(args.output).write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_checkpoints(report, args.plot, title=f"{Path(args.data).name}, {len(records)} sequential edits")
    return summary


def _head(base: dict, done: list) -> dict:
    """The part of a user baseline that belongs to the first ``len(done)`` records."""
    n = len(done)
    k_loc = sum(1 for r in done if r.loc_prompt)
    k_spec = sum(len(r.specificity) for r in done)
    out = {"loc": base["loc"][:k_loc], "spec": base["spec"][:k_spec], "fluency": base["fluency"][:n]}
    if "chat_ends" in base:
        out["chat_ends"] = base["chat_ends"][:n]
    return out


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="horen eval", description=__doc__)
    add_eval_arguments(p)
    args = p.parse_args(argv)
    summary = run_eval(args)
    print(json.dumps(summary))
    return 0
