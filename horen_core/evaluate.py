"""Sequential-editing evaluation: load ZsRE (MEND), CounterFact (EasyEdit's, or ROME's original
records with their paraphrase and neighbourhood prompts), KnowEdit (EasyEdit's KnowEdit JSON) or
UnKE records, make N edits in order, then score all of them the way the paper's
code scores HoReN (token match on as many tokens as the target has) and the way a user reads the
model's answers (``user_scores``: the target in a free answer, plain and chat; unchanged answers on
locality and same-subject prompts; fluency; portability; ROUGE-L/BLEU for long-form answers)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from horen_core.editor import HorenEditor


@dataclass(frozen=True)
class EditRecord:
    prompt: str
    target: str
    rephrase: str | None
    loc_prompt: str | None
    loc_answer: str | None
    specificity: tuple[str, ...] = ()  # same subject, another relation: the answer must not change
    portability: tuple[tuple[str, str], ...] = ()  # (prompt, answer) that follow from the edit
    sub_questions: tuple[tuple[str, str], ...] = ()  # UnKE: (question, answer) about the long answer
    subject: str | None = None  # the subject the data set names (None: it names none)
    source: str = ""  # the data file it came from, in a mixed stream (``horen_core.stream``)


FORMATS = ("zsre", "counterfact", "rome", "knowedit", "unke", "tsv")


def detect_format(rows: list[dict]) -> str:
    first = rows[0] if rows else {}
    if not isinstance(first, dict):
        raise ValueError("unknown data format: expected a JSON list of records")
    if "src" in first:
        return "zsre"
    if "requested_rewrite" in first:
        return "rome"
    if "question" in first and "answer" in first:
        return "unke"
    if "target_new" in first and isinstance(first.get("locality"), dict):
        return "knowedit"
    if "target_new" in first:
        return "counterfact"
    raise ValueError(
        "unknown data format: expected ZsRE MEND fields (src, ...), CounterFact (prompt, target_new; or "
        "ROME's requested_rewrite), "
        "KnowEdit (prompt, target_new, locality) or UnKE (question, answer)"
    )


def _first_answer(gt) -> str:
    while isinstance(gt, list):
        if not gt:
            return ""
        gt = gt[0]
    return str(gt)


def _record(r: dict, fmt: str, target_field: str) -> EditRecord:
    if fmt == "zsre":
        target = r["answers"][0] if target_field == "answers" else r[target_field]
        return EditRecord(r["src"], target, r.get("rephrase"), r.get("loc"), r.get("loc_ans"))
    if fmt == "counterfact":
        target = r["target_new"] if target_field == "answers" else r[target_field]
        return EditRecord(
            r["prompt"], target, r.get("rephrase_prompt"), r.get("locality_prompt"), r.get("locality_ground_truth")
        )
    if fmt == "rome":
        # ROME's CounterFact: paraphrase_prompts ask the same relation (after a noise sentence);
        # neighborhood_prompts ask it of other subjects whose answer must not change
        rw = r["requested_rewrite"]
        subject = rw["subject"]
        neighbours = tuple(r.get("neighborhood_prompts") or ())
        return EditRecord(
            rw["prompt"].format(subject),
            rw["target_new"]["str"],
            (r.get("paraphrase_prompts") or [None])[0],
            neighbours[0] if neighbours else None,
            rw["target_true"]["str"] if neighbours else None,
        )
    if fmt == "knowedit":
        loc = r.get("locality") or {}
        port = r.get("portability") or {}
        spec = tuple(x["prompt"] for x in loc.get("Relation_Specificity") or [])
        others = [x for k, v in loc.items() if k != "Relation_Specificity" for x in v or []]
        ported = tuple((x["prompt"], _first_answer(x["ground_truth"])) for v in port.values() for x in v or [])
        alias = [x["prompt"] for x in port.get("Subject_Aliasing") or []]
        rephrase = r.get("rephrase") or (alias[0] if alias else None)
        return EditRecord(
            r["prompt"],
            r["target_new"],
            rephrase,
            others[0]["prompt"] if others else None,
            _first_answer(others[0]["ground_truth"]) if others else None,
            specificity=spec,
            portability=ported,
        )
    if fmt == "unke":
        subs = tuple(zip(r.get("sub_question") or [], r.get("sub_answer") or []))
        return EditRecord(r["question"], r["answer"], r.get("para_question"), None, None, sub_questions=subs)
    raise ValueError(f"unknown format {fmt!r}")


def load_records(
    path: str | Path, fmt: str = "auto", target_field: str = "answers", n: int | None = None, offset: int = 0
) -> list[EditRecord]:
    """Records of a data file in one of ``FORMATS``; a malformed record raises ``ValueError``
    naming its index and the missing field, and so does an ``offset`` past the last record."""
    if fmt == "tsv" or (fmt == "auto" and Path(path).suffix in (".tsv", ".txt")):
        return _load_pairs(path, n, offset)
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    if fmt == "auto":
        fmt = detect_format(rows)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    _check_offset(path, offset, len(rows))
    out = []
    for i, r in enumerate(rows[offset : offset + n if n is not None else None], start=offset):
        try:
            rec = _record(r, fmt, target_field)
            named = r["requested_rewrite"].get("subject") if fmt == "rome" else r.get("subject")
            if isinstance(named, str) and named.strip():
                rec = replace(rec, subject=named)
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{path}: record {i} is not a valid {fmt} record (missing or bad {exc})") from exc
        if not isinstance(rec.prompt, str) or not rec.prompt.strip() or not str(rec.target).strip():
            raise ValueError(f"{path}: record {i} has an empty prompt or target")
        out.append(rec)
    return out


def _check_offset(path: str | Path, offset: int, count: int) -> None:
    if offset < 0 or (count and offset >= count):
        raise ValueError(f"{path}: offset {offset} is outside its {count} records (0 to {count - 1})")


def _load_pairs(path: str | Path, n: int | None, offset: int) -> list[EditRecord]:
    """``prompt<TAB>target`` lines (ZsRE's MEND train pairs): edits with no rephrase or locality. A
    line with an empty target (the file has some) is skipped: there is nothing to edit."""
    out = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    _check_offset(path, offset, len(lines))
    for i, line in enumerate(lines[offset : offset + n if n is not None else None], start=offset):
        prompt, tab, target = line.partition("\t")
        if not tab or not prompt.strip():
            raise ValueError(f"{path}: line {i + 1} is not 'prompt<TAB>target'")
        if not target.strip():
            continue
        out.append(EditRecord(prompt.strip(), target.strip(), None, None, None))
    return out


def _batches(items: Sequence[int], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def greedy_match(
    editor: HorenEditor, prompts: Sequence[str], targets: Sequence[list[int]], batch_size: int = 8
) -> list[float]:
    """Fraction of target tokens reproduced by greedy generation of len(target) tokens."""
    scores = [0.0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for chunk in _batches(order, batch_size):
        n = max(len(targets[i]) for i in chunk)
        seqs = [editor.encode_prompt(prompts[i], reserve=n) for i in chunk]
        gens = editor.greedy(seqs, n)
        for i, toks in zip(chunk, gens):
            t = targets[i]
            scores[i] = sum(int(a == b) for a, b in zip(toks[: len(t)], t)) / len(t)
    return scores


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


def locality_outputs(editor: HorenEditor, records: Sequence[EditRecord]) -> list[list[int] | None]:
    """Greedy answers to the locality prompts, as many tokens as each locality answer has."""
    idx = [i for i, r in enumerate(records) if r.loc_prompt]
    outs: list[list[int] | None] = [None] * len(records)
    order = sorted(idx, key=lambda i: len(records[i].loc_prompt))
    for chunk in _batches(order, 8):
        lens = [len(editor.encode_target(records[i].loc_answer or "x")) for i in chunk]
        n = max(lens)
        seqs = [editor.encode_prompt(records[i].loc_prompt, reserve=n) for i in chunk]
        gens = editor.greedy(seqs, n)
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
    loc_now = locality_outputs(editor, records)
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


def routes(editor: HorenEditor, records: Sequence[EditRecord], edit_ids: Sequence[int | None]) -> list[dict]:
    """Per record, where its prompt, its rephrase and its locality prompt are routed: ``own`` (the
    entry its edit is in), ``other`` (another entry) or ``none``; a locality prompt routed to
    another entry is ``named`` instead where that entry's edit has a subject the prompt names (a
    neighbour whose own fact was edited too, rightly routed). A record whose edit is no longer in
    the codebook gets none of these."""
    own = [editor.codebook.entry_of_edit(e) if e is not None else None for e in edit_ids]
    rows: list[dict] = [{} for _ in records]
    for key, idx in (
        ("rewrite_route", [i for i in range(len(records)) if own[i] is not None]),
        ("rephrase_route", [i for i in range(len(records)) if own[i] is not None and records[i].rephrase]),
        ("locality_route", [i for i in range(len(records)) if own[i] is not None and records[i].loc_prompt]),
    ):
        field = {"rewrite_route": "prompt", "rephrase_route": "rephrase", "locality_route": "loc_prompt"}[key]
        prompts = [getattr(records[i], field) for i in idx]
        for i, p, g in zip(idx, prompts, answers(editor, prompts, 1)):
            route = "none" if g.entry_id is None else "own" if g.entry_id == own[i] else "other"
            subject = editor.store.subjects.get(g.edit_id, "") if route == "other" else ""
            rows[i][key] = "named" if key == "locality_route" and subject and subject.lower() in p.lower() else route
    return rows


def summarize_routes(rows: list[dict]) -> dict:
    """The share of each route (``routes``) of the prompts, the rephrases and the locality prompts."""
    out = {}
    for key in ("rewrite_route", "rephrase_route", "locality_route"):
        got = [r[key] for r in rows if key in r]
        kinds = ("own", "other", "none") + (("named",) if key == "locality_route" else ())
        if got:
            out[key + "s"] = {k: round(got.count(k) / len(got), 4) for k in kinds}
    return out


def summarize(rows: list[dict]) -> dict:
    """Means of ``score`` rows; ``overall`` is the paper's mean of rewrite, rephrase and locality
    (of those present)."""
    keys = ("rewrite_acc", "rephrase_acc", "locality", "rewrite_acc_tf", "rephrase_acc_tf")
    out = {k: _mean([r[k] for r in rows if k in r]) for k in keys}
    parts = [out[k] for k in ("rewrite_acc", "rephrase_acc", "locality") if out[k] is not None]
    out["overall"] = _mean(parts)
    return out


def _mean(vals: Sequence[float]) -> float | None:
    return round(sum(vals) / len(vals), 4) if vals else None


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


# ---- what a user sees ------------------------------------------------------------------------
FREE_TOKENS = 32  # a free answer's budget
CHAT_TOKENS = 48  # a chat reply's budget (the unedited model's replies to a question fit in it)
LOCAL_TOKENS = 16  # locality and specificity compare this many tokens of answer


def chat_prompt(editor: HorenEditor, question: str) -> str:
    """``question`` as a user message in the model's chat template, system prompt included."""
    return editor.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def answers(editor: HorenEditor, prompts: Sequence[str], n: int, forced: bool = False):
    """Greedy answers of up to ``n`` tokens (exactly ``n`` when ``forced``), in batches of 8."""
    out = []
    for chunk in _batches(list(prompts), 8):
        out += editor.generate(chunk, max_new_tokens=n, min_new_tokens=n if forced else 0)
    return out


def distinct_trigrams(text: str) -> float:
    """Distinct word 3-grams over all word 3-grams (1.0 for text too short to have any)."""
    w = text.split()
    grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def contains(target: str, text: str) -> float:
    return float(target.strip().lower() in text.lower())


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F1 over lower-cased words."""
    r, h = reference.lower().split(), hypothesis.lower().split()
    if not r or not h:
        return 0.0
    prev = [0] * (len(h) + 1)
    for a in r:
        cur = [0]
        for j, b in enumerate(h):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, q = lcs / len(h), lcs / len(r)
    return 2 * p * q / (p + q)


def bleu(reference: str, hypothesis: str, n: int = 4) -> float:
    """Sentence BLEU-n over lower-cased words, add-one smoothed above unigrams."""
    import math
    from collections import Counter

    r, h = reference.lower().split(), hypothesis.lower().split()
    if not h:
        return 0.0
    logs = 0.0
    for k in range(1, n + 1):
        hg = Counter(tuple(h[i : i + k]) for i in range(len(h) - k + 1))
        rg = Counter(tuple(r[i : i + k]) for i in range(len(r) - k + 1))
        match, total = sum(min(c, rg[g]) for g, c in hg.items()), max(sum(hg.values()), 0)
        if k > 1:
            match, total = match + 1, total + 1
        if not match or not total:
            return 0.0
        logs += math.log(match / total) / n
    brevity = min(1.0, math.exp(1 - len(r) / len(h)))
    return brevity * math.exp(logs)


def _long(record: EditRecord) -> bool:
    return bool(record.sub_questions) or len(record.target.split()) > 12


def user_baseline(editor: HorenEditor, records: Sequence[EditRecord], chat: bool) -> dict:
    """The unedited model's answers that ``user_scores`` compares against: locality and specificity
    answers, forced free answers (fluency) and, with ``chat``, whether its chat replies end."""
    with editor.unedited():
        loc = [r for r in records if r.loc_prompt]
        spec = [p for r in records for p in r.specificity]
        base = {
            "loc": [g.token_ids for g in answers(editor, [r.loc_prompt for r in loc], LOCAL_TOKENS)],
            "spec": [g.token_ids for g in answers(editor, spec, LOCAL_TOKENS)],
            "fluency": [
                distinct_trigrams(g.text)
                for g in answers(editor, [r.prompt for r in records], FREE_TOKENS, forced=True)
            ],
        }
        if chat:
            replies = answers(editor, [chat_prompt(editor, r.prompt) for r in records], CHAT_TOKENS)
            base["chat_ends"] = [float(len(g.token_ids) < CHAT_TOKENS) for g in replies]
    return base


def user_scores(editor: HorenEditor, records: Sequence[EditRecord], baseline: dict, chat: bool) -> list[dict]:
    """Per record, what a user reads after all edits: ``rewrite_contains`` / ``rephrase_contains``
    (the target in a free answer), with ``chat`` the same in the chat template and ``chat_ends``
    (the reply ends within its budget); ``fluency`` (distinct word 3-grams of a forced 32-token
    answer); ``locality_free`` and ``specificity`` (16-token answers unchanged) and how many of
    those prompts were routed to an edit; ``portability``; for long answers ROUGE-L and BLEU of the
    answer to the question and its paraphrase and the sub-question accuracy."""
    rows: list[dict] = [{} for _ in records]

    def put(idx: Sequence[int], key: str, values: Sequence[float]) -> None:
        for i, v in zip(idx, values):
            rows[i][key] = v

    def budget(i: int) -> int:
        r = records[i]
        return min(len(editor.encode_target(r.target)) + 16, 512) if _long(r) else FREE_TOKENS

    every = list(range(len(records)))
    reph = [i for i in every if records[i].rephrase]
    for idx, prompts, key in (
        (every, [r.prompt for r in records], "rewrite"),
        (reph, [records[i].rephrase for i in reph], "rephrase"),
    ):
        n = max((budget(i) for i in idx), default=FREE_TOKENS)
        got = answers(editor, prompts, n)
        put(idx, f"{key}_contains", [contains(records[i].target, g.text) for i, g in zip(idx, got)])
        long = [(i, g) for i, g in zip(idx, got) if _long(records[i])]
        put([i for i, _ in long], f"{key}_rouge_l", [rouge_l(records[i].target, g.text) for i, g in long])
        put([i for i, _ in long], f"{key}_bleu", [bleu(records[i].target, g.text) for i, g in long])
        if chat:
            replies = answers(editor, [chat_prompt(editor, p) for p in prompts], max(n, CHAT_TOKENS))
            put(idx, f"chat_{key}_contains", [contains(records[i].target, g.text) for i, g in zip(idx, replies)])
            if key == "rewrite":
                put(idx, "chat_ends", [float(len(g.token_ids) < CHAT_TOKENS) for g in replies])
    forced = answers(editor, [r.prompt for r in records], FREE_TOKENS, forced=True)
    put(every, "fluency", [distinct_trigrams(g.text) for g in forced])
    loc = [i for i in every if records[i].loc_prompt]
    got = answers(editor, [records[i].loc_prompt for i in loc], LOCAL_TOKENS)
    put(loc, "locality_free", [float(g.token_ids == b) for g, b in zip(got, baseline["loc"])])
    put(loc, "locality_routed", [float(g.edit_id is not None) for g in got])
    spec_idx = [i for i in every for _ in records[i].specificity]
    got = answers(editor, [p for r in records for p in r.specificity], LOCAL_TOKENS)
    put(*_per_record(spec_idx, "specificity", [float(g.token_ids == b) for g, b in zip(got, baseline["spec"])]))
    put(*_per_record(spec_idx, "specificity_routed", [float(g.edit_id is not None) for g in got]))
    port_idx = [i for i in every for _ in records[i].portability]
    got = answers(editor, [p for r in records for p, _ in r.portability], FREE_TOKENS)
    wanted = [a for r in records for _, a in r.portability]
    put(*_per_record(port_idx, "portability", [contains(a, g.text) for g, a in zip(got, wanted)]))
    sub_idx = [i for i in every for _ in records[i].sub_questions]
    got = answers(editor, [q for r in records for q, _ in r.sub_questions], FREE_TOKENS)
    wanted = [a.rstrip(".") for r in records for _, a in r.sub_questions]
    put(*_per_record(sub_idx, "sub_question_acc", [contains(a, g.text) for g, a in zip(got, wanted)]))
    return rows


def specificity_summary(editor: HorenEditor, records: Sequence[EditRecord], baseline: Sequence[list[int]]) -> dict:
    """Over every specificity prompt of ``records`` (``baseline``: the unedited model's answers to
    them, in order): the share whose ``LOCAL_TOKENS``-token answer is unchanged and the share
    routed to an edit, each prompt counted once, and how many prompts."""
    got = answers(editor, [p for r in records for p in r.specificity], LOCAL_TOKENS)
    n = len(got)
    return {
        "relation_specificity": round(sum(g.token_ids == b for g, b in zip(got, baseline)) / n, 4) if n else None,
        "relation_specificity_routed": round(sum(g.edit_id is not None for g in got) / n, 4) if n else None,
        "relation_specificity_prompts": n,
    }


def _per_record(idx: Sequence[int], key: str, values: Sequence[float]) -> tuple[list[int], str, list[float]]:
    """Mean of the values that belong to each record (``idx[j]`` is the record of ``values[j]``)."""
    per: dict[int, list[float]] = {}
    for i, v in zip(idx, values):
        per.setdefault(i, []).append(v)
    return list(per), key, [sum(v) / len(v) for v in per.values()]


USER_FIELDS = (
    "rewrite_contains",
    "rephrase_contains",
    "chat_rewrite_contains",
    "chat_rephrase_contains",
    "chat_ends",
    "locality_free",
    "locality_routed",
    "specificity",
    "specificity_routed",
    "portability",
    "rewrite_rouge_l",
    "rewrite_bleu",
    "rephrase_rouge_l",
    "rephrase_bleu",
    "sub_question_acc",
)


def summarize_user(rows: list[dict], baseline: dict) -> dict:
    """Means of ``user_scores`` rows; ``fluency_ratio`` is the edited answers' mean distinct-3-gram
    ratio over the unedited ones'; ``chat_ends_base`` how often unedited chat replies end."""

    out = {k: _mean([r[k] for r in rows if k in r]) for k in USER_FIELDS}
    edited, base = _mean([r["fluency"] for r in rows if "fluency" in r]), _mean(baseline["fluency"])
    out["fluency_ratio"] = round(edited / base, 4) if edited is not None and base else None
    if "chat_ends" in baseline:
        out["chat_ends_base"] = _mean(baseline["chat_ends"])
    return {k: v for k, v in out.items() if v is not None}
