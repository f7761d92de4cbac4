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
from horen_core.edits import Fact
from horen_core.errors import InvalidInputError
from horen_core.evaluate import (
    FORMATS,
    EditRecord,
    chat_prompt,
    edit_seconds_stats,
    load_records,
    routes,
    score,
    specificity_summary,
    summarize,
    summarize_routes,
    summarize_user,
    user_scores,
)
from horen_core.modeling import load_model
from horen_core.plotting import plot_checkpoints
from horen_core.stream import Baselines, dedupe, fingerprint, generated_facts, mixed_stream, sample


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    d = HorenConfig()
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help="ZsRE (MEND), CounterFact (EasyEdit or ROME), KnowEdit (EasyEdit) or UnKE JSON file, or a "
        "prompt<TAB>target file; several files are mixed into one stream (--seed), repeated prompts dropped",
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
    p.add_argument("--seed", type=int, default=0, help="the order of a mixed stream and of the scored sample")
    p.add_argument("--sample", type=int, default=0, help="score a fixed random sample of this many edits (0: all)")
    p.add_argument("--user-sample", type=int, default=0, help="of those, what a user sees on this many (0: all)")
    p.add_argument("--batch", type=int, default=1, help="train this many edits at once (edit_many; 1: one by one)")
    p.add_argument(
        "--fill-to", type=int, default=0, help="after the records, generated facts (never scored) up to this many edits"
    )
    p.add_argument(
        "--state", default=None, metavar="DIR", help="save the codebook at each checkpoint here; rerun to resume"
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
        records, dropped = _stream(args)
    except (OSError, ValueError) as exc:  # a missing file or a bad record: one line, not a traceback
        raise SystemExit(f"horen eval: {exc}") from None
    model, tokenizer = load_model(args.model, device=args.device, converted_dir=args.converted_dir or None)
    editor = HorenEditor(model, tokenizer, config_from_args(args))
    user = not args.no_user_metrics
    chat = (args.chat or args.edit_chat) and editor.chat.available
    baselines = Baselines(editor, records, chat)
    state = _State(Path(args.state), records) if args.state else None
    report: dict = {"config": editor.config.to_dict(), "checkpoints": {}}
    progress = state.resume(editor) if state else None
    done, seconds, steps, created, refused = (
        (progress["done"], progress["seconds"], progress["steps"], progress["created"], progress["refused"])
        if progress
        else (0, [], [], 0, 0)
    )
    # each record's edit id (None: refused); a state saved without them had ids 1.. in order
    edit_of = (progress.get("edit_of") or list(range(1, done + 1))) if progress else []
    if progress:
        report["checkpoints"] = progress["checkpoints"]
        print(f"horen eval: resuming after {done} edits from {args.state}", file=sys.stderr)
    wanted = {int(c) for c in args.checkpoints.split(",") if c.strip()}
    stops = sorted(c for c in wanted if done <= c < len(records) and str(c) not in report["checkpoints"])
    bar = tqdm(total=len(records), initial=done, desc="editing", file=sys.stderr)
    for stop in [*stops, len(records)]:
        while done < stop:
            chunk = records[done : min(stop, done + max(args.batch, 1))]
            for res in _edit(editor, chunk, args):
                edit_of.append(None if isinstance(res, InvalidInputError) else res.edit_id)
                if isinstance(res, InvalidInputError):
                    refused += 1
                    continue
                seconds.append(res.seconds)
                steps.append(res.steps)
                created += int(res.created)
            done += len(chunk)
            bar.update(len(chunk))
        if state:  # before scoring: an interrupted run resumes with these edits made
            state.save(editor, done, seconds, steps, created, refused, edit_of, report["checkpoints"])
        if stop == len(records):
            break
        t0 = time.perf_counter()
        summary, _ = _score(editor, records, edit_of, stop, baselines, args, user, chat)
        summary["score_seconds"] = round(time.perf_counter() - t0, 1)
        report["checkpoints"][str(stop)] = {"n": stop, **summary, "keys": len(editor.codebook)}
        print(json.dumps({"checkpoint": stop, **summary}), file=sys.stderr)
        if state:
            state.save(editor, done, seconds, steps, created, refused, edit_of, report["checkpoints"])
    bar.close()
    t0 = time.perf_counter()
    summary, rows = _score(editor, records, edit_of, len(records), baselines, args, user, chat)
    summary = {
        "n": len(records),
        **summary,
        **edit_seconds_stats(seconds),
        "mean_steps": round(sum(steps) / max(len(steps), 1), 2),
        "keys": len(editor.codebook),
        "refused": refused,
        "peak_memory_mb": peak_memory_mb(),
        "score_seconds": round(time.perf_counter() - t0, 1),
        "reference_procedure": bool(args.reference_procedure),
    }
    if len(args.data) > 1 or args.fill_to:
        summary["stream"] = {"files": len(args.data), "duplicates_dropped": dropped, "seed": args.seed}
    report["summary"] = summary
    report["records"] = rows
    if state:  # a later run with a larger --n goes on from here
        report["checkpoints"][str(len(records))] = {k: v for k, v in summary.items() if k != "stream"}
        state.save(editor, done, seconds, steps, created, refused, edit_of, report["checkpoints"])
    Path(args.output).write_text(json.dumps(report, indent=1))
    if args.plot:
        names = ", ".join(Path(d).name for d in args.data)
        plot_checkpoints(report, args.plot, title=f"{names}: {len(records)} sequential edits")
    return summary


def _stream(args: argparse.Namespace) -> tuple[list[EditRecord], int]:
    """The records to edit, in order: one file as it is, or several mixed (``mixed_stream``); then
    ``--offset``/``--n``; then generated facts up to ``--fill-to``."""
    if len(args.data) == 1:
        records, dropped = load_records(args.data[0], args.format, args.target_field, args.n, args.offset), 0
    else:
        records, dropped = mixed_stream(args.data, args.format, args.target_field, args.seed)
        records = records[args.offset : args.offset + args.n]
    if args.fill_to > len(records):
        # the real records first: they are scored after all the filler edits have been made on top
        records, more = dedupe([*records, *generated_facts(args.fill_to - len(records), args.seed)])
        dropped += more
    return records, dropped


def _edit(editor: HorenEditor, chunk: list[EditRecord], args: argparse.Namespace):
    """Edit each record of ``chunk`` in order: one ``edit`` at a time, or one ``edit_many``."""
    facts = [
        Fact(
            chat_prompt(editor, rec.prompt) if args.edit_chat else rec.prompt,
            rec.target,
            subject=rec.subject if args.given_subjects else None,
        )
        for rec in chunk
    ]
    if args.batch > 1:
        return editor.edit_many(facts, batch=args.batch)
    return [editor.edit(f.prompt, f.target, subject=f.subject) for f in facts]


def _score(editor, records, edit_of, done, baselines, args, user, chat) -> tuple[dict, list[dict]]:
    """The summary of the records scored after ``done`` edits (``--sample``: a fixed random sample
    of them; ``--user-sample``: the first of those for what a user sees) and their rows."""
    idx = sample(records, done, args.sample, args.seed)
    chosen = [records[i] for i in idx]
    rows = score(editor, chosen, baselines.locality(idx))
    for row, extra in zip(rows, routes(editor, chosen, [edit_of[i] for i in idx])):
        row.update(extra)
    summary = summarize(rows) | summarize_routes(rows)
    spec = [i for i in idx if records[i].specificity]
    if spec:  # every scored record's, not only the user sample's
        summary |= specificity_summary(editor, [records[i] for i in spec], baselines.specificity(spec))
    if user:
        uidx = idx[: args.user_sample] if args.user_sample else idx
        base = baselines.user(uidx)
        for row, extra in zip(rows, user_scores(editor, chosen[: len(uidx)], base, chat)):
            row.update(extra)
        summary |= summarize_user(rows[: len(uidx)], base)
    for row, i in zip(rows, idx):
        row["index"], row["source"] = i, records[i].source
    sources = sorted({r["source"] for r in rows})
    if len(sources) > 1:
        summary["by_source"] = {s: summarize([r for r in rows if r["source"] == s]) for s in sources}
    if args.sample or args.user_sample:
        summary["scored"] = len(idx)
        summary["user_scored"] = len(uidx) if user else 0
    return summary, rows


class _State:
    """``--state DIR``: the codebook and progress saved at each checkpoint, so that a rerun of the
    same stream (or of a longer one that begins with the edits made) goes on where it stopped."""

    def __init__(self, folder: Path, records: list[EditRecord]) -> None:
        self.folder, self.records = folder, records

    def resume(self, editor: HorenEditor) -> dict | None:
        path = self.folder / "progress.json"
        if not path.exists():
            return None
        progress = json.loads(path.read_text())
        done = progress["done"]
        if done > len(self.records) or progress.get("stream") != fingerprint(self.records[:done]):
            raise SystemExit(f"horen eval: {self.folder} holds another stream's progress; use a new --state folder")
        editor.load(self.folder / "codebook.safetensors")
        return progress

    def save(self, editor, done, seconds, steps, created, refused, edit_of, checkpoints) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        editor.save(self.folder / "codebook.tmp")
        (self.folder / "codebook.tmp").replace(self.folder / "codebook.safetensors")
        progress = {
            "stream": fingerprint(self.records[:done]),
            "done": done,
            "seconds": seconds,
            "steps": steps,
            "created": created,
            "refused": refused,
            "edit_of": edit_of,
            "checkpoints": checkpoints,
        }
        (self.folder / "progress.tmp").write_text(json.dumps(progress))
        (self.folder / "progress.tmp").replace(self.folder / "progress.json")


def eval_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="horen eval", description=__doc__)
    add_eval_arguments(p)
    args = p.parse_args(argv)
    summary = run_eval(args)
    print(json.dumps(summary))
    return 0
