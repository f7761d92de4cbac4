"""Fit the relation gate (horen_core/gate.py) of a model from the development data sets.

Pairs of questions about one subject: the same question asked another way (a data set's rephrase,
the chat form of the question, MQuAKE's question and cloze of one hop) must pass; another relation
of the subject (KnowEdit's Relation_Specificity prompts, another record's question with this
record's subject put in, MQuAKE's other relations, templated questions) must not. The records are
split three ways: the map is fitted on the first part, its threshold (the cosine that keeps
``--keep`` of the rephrased questions, or ``--threshold``) is set on the second, and the third is
only reported, beside the shipped gate's numbers on the same pairs. Every subject is the one an
edit would infer from its question.

    .venv/bin/python scripts/fit_gate.py --data ../shared/data [--model PATH] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import torch

from horen_core import HorenConfig
from horen_core.editor import HorenEditor
from horen_core.gate import GATES_DIR, RelationGate, fit, relation_features
from horen_core.modeling import load_model
from horen_core.subjects import resolve_subject

# other relations, asked as a person would; the fitting split and the reported split use different ones
FIT_TEMPLATES = [
    "Where was {} born?",
    "What is the occupation of {}?",
    "Who founded {}?",
    "When did {} die?",
    "What country is {} from?",
    "Who is the father of {}?",
    "What is {} famous for?",
    "What language does {} speak?",
    "Where is {} located?",
    "When was {} created?",
]
REPORT_TEMPLATES = [
    "Where did {} grow up?",
    "What does {} do for a living?",
    "Who created {}?",
    "What year was {} born?",
    "Which city is {} based in?",
    "What award did {} win?",
    "Who is married to {}?",
    "What sport does {} play?",
]


class Pairs:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str, bool], int] = {}
        self.rows: list[tuple[int, int, int, str, str]] = []  # a, b, same, split, kind

    def item(self, question: str, subject: str, chat: bool) -> int:
        return self.items.setdefault((question, subject, chat), len(self.items))

    def add(self, q: str, other: str, subject: str, same: int, split: str, kind: str) -> None:
        for chat_a, chat_b in ((False, False), (True, True), (False, True)) if same else ((False, False), (True, True)):
            self.rows.append((self.item(q, subject, chat_a), self.item(other, subject, chat_b), same, split, kind))


def questions(pairs: Pairs, name: str, recs: list[dict], split: str, rng: random.Random) -> None:
    """Records with a question, a rephrase and the data set's subject written in the question."""
    relations = [r["q"].replace(r["s"], "{}") for r in recs if r["s"] in r["q"]]
    templates = FIT_TEMPLATES if split != "report" else REPORT_TEMPLATES
    for r in recs:
        q, s = r["q"], r["s"]
        if s not in q:
            continue
        subject = resolve_subject(q, None)
        pairs.add(q, q, subject, 1, split, f"{name} chat form")
        pairs.add(q, r["rephrase"], subject, 1, split, f"{name} rephrase")
        other = rng.choice(relations)
        if other != q.replace(s, "{}"):
            pairs.add(q, other.replace("{}", s, 1), subject, 0, split, f"{name} other record's relation")
        pairs.add(q, rng.choice(templates).format(s), subject, 0, split, "templated other relation")


def knowedit(pairs: Pairs, recs: list[dict], split: str) -> None:
    for r in recs:
        subject = resolve_subject(r["prompt"], None)
        for spec in r["locality"].get("Relation_Specificity", [])[:3]:
            pairs.add(r["prompt"], spec["prompt"], subject, 0, split, "knowedit same subject")


def mquake(pairs: Pairs, recs: list[dict], split: str, rng: random.Random) -> None:
    """MQuAKE's single hops: a relation asked as a question and as a cloze must pass; the subject
    put into another relation's question or cloze must not."""
    hops, forms = {}, {}
    for r in recs:
        for hop, (s, rel, _) in zip(r["single_hops"], r["orig"]["triples_labeled"]):
            if s in hop["question"] and s in hop["cloze"]:
                hops.setdefault(hop["question"], (hop["cloze"], s, rel))
                forms.setdefault(rel, (hop["question"].replace(s, "{}"), hop["cloze"].replace(s, "{}")))
    relations = sorted(forms)
    for q, (cloze, s, rel) in hops.items():
        subject = resolve_subject(q, None)
        pairs.add(q, cloze, subject, 1, split, "mquake question and cloze")
        other = rng.choice([x for x in relations if x != rel])
        pairs.add(q, rng.choice(forms[other]).format(s), subject, 0, split, "mquake other relation")


def build(data: Path, seed: int = 0) -> Pairs:
    rng = random.Random(seed)
    pairs = Pairs()
    z = [
        {"q": r["src"], "rephrase": r["rephrase"], "s": r["subject"]}
        for r in json.loads((data / "zsre/zsre_edit_dev.json").read_text())
    ]
    cf = [
        {"q": r["prompt"], "rephrase": r["rephrase_prompt"], "s": r["subject"]}
        for r in json.loads((data / "counterfact/counterfact-train.json").read_text())
    ]
    cv = [
        {"q": r["prompt"], "rephrase": r["rephrase_prompt"], "s": r["subject"]}
        for r in json.loads((data / "counterfact/counterfact-val.json").read_text())
    ]
    kc = json.loads((data / "knowedit/wiki_counterfact_train_cf.json").read_text())
    kr = json.loads((data / "knowedit/wiki_recent_train.json").read_text())
    questions(pairs, "zsre", z[:300], "fit", rng)
    questions(pairs, "zsre", z[300:400], "threshold", rng)
    questions(pairs, "zsre", z[400:600], "report", rng)
    questions(pairs, "counterfact", cf[:800], "fit", rng)
    questions(pairs, "counterfact", cf[800:1000], "threshold", rng)
    questions(pairs, "counterfact", cv[:200], "report", rng)
    knowedit(pairs, kc[:300], "fit")
    knowedit(pairs, kc[300:400], "threshold")
    knowedit(pairs, kr[500:], "report")
    questions(pairs, "counterfact", cf[1000:4000], "fit", rng)
    knowedit(pairs, kc[400:1000], "fit")
    knowedit(pairs, kr[:200], "fit")
    for name in ("MQuAKE-hard.json", "AKEW_MQuAKE-CF.json"):
        mquake(pairs, json.loads((data / "mquake" / name).read_text()), "fit", rng)
    return pairs


def features(editor: HorenEditor, pairs: Pairs, cache: dict, batch: int = 64) -> torch.Tensor:
    """[questions, 2 dk] in ``pairs.items`` order; ``cache`` (question, subject, chat) -> features
    is read and filled."""
    keys = sorted(pairs.items, key=pairs.items.get)
    todo = [k for k in keys if k not in cache]
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        for chat in (False, True):
            part = [k for k in chunk if k[2] == chat]
            if part:
                got = relation_features(editor, [k[0] for k in part], [k[1] for k in part], chat=chat)
                cache.update(zip(part, got))
        print(f"features {min(start + batch, len(todo))}/{len(todo)}", end="\r", flush=True)
    print()
    return torch.stack([cache[k] for k in keys])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default=None, help="gate file (default: horen_core/gates/<model fingerprint>.safetensors)")
    p.add_argument(
        "--keep", type=float, default=0.89, help="the share of threshold-split rephrased questions the gate passes"
    )
    p.add_argument("--threshold", type=float, default=None, help="instead, the gate's cosine threshold")
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--features", default=None, help="cache file of extracted features, read and updated")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, converted_dir=str(Path.home() / ".cache/horen/converted"))
    editor = HorenEditor(model, tokenizer, HorenConfig(relation_gate=False))
    pairs = build(Path(args.data))
    print(f"{len(pairs.items)} questions, {len(pairs.rows)} pairs")
    cache_file = Path(args.features) if args.features else None
    cache = torch.load(cache_file) if cache_file and cache_file.exists() else {}
    feats = features(editor, pairs, cache)
    if cache_file:
        torch.save(cache, cache_file)

    def split(name: str) -> list[tuple[int, int, int, str, str]]:
        return [r for r in pairs.rows if r[3] == name]

    fit_rows = split("fit")
    a = feats[[r[0] for r in fit_rows]]
    b = feats[[r[1] for r in fit_rows]]
    weight, mean = fit(a, b, torch.tensor([r[2] for r in fit_rows]), rank=args.rank, epochs=args.epochs)
    gate = RelationGate(weight, mean, 0.0)
    emb = gate.embed(feats)

    def cosines(rows):
        return (emb[[r[0] for r in rows]] * emb[[r[1] for r in rows]]).sum(-1)

    # set on rephrased questions: the hardest positives (completions' rephrases pass more easily)
    rephrases = cosines([r for r in split("threshold") if r[2] and r[4] == "zsre rephrase"])
    if args.threshold is not None:
        gate.threshold = args.threshold
    else:
        gate.threshold = round(float(torch.quantile(rephrases, 1 - args.keep)), 4)
    kept = float((rephrases >= gate.threshold).float().mean())
    print(f"threshold {gate.threshold} (keeps {kept:.3f} of the threshold split's rephrased questions)")
    shipped = RelationGate.shipped(editor.fingerprint)
    old = shipped.embed(feats) if shipped is not None else None
    for name in ("fit", "threshold", "report"):
        rows = split(name)
        for kind, n in sorted(Counter(r[4] for r in rows).items()):
            sel = [r for r in rows if r[4] == kind]
            passing = float((cosines(sel) >= gate.threshold).float().mean())
            line = f"  {name:9s} {kind:38s} pairs {n:5d}  passing {passing:.3f}"
            if old is not None:
                was = (old[[r[0] for r in sel]] * old[[r[1] for r in sel]]).sum(-1) >= shipped.threshold
                line += f"  (shipped gate {float(was.float().mean()):.3f})"
            print(f"{line}  should {'pass' if sel[0][2] else 'not'}")
    out = Path(args.out) if args.out else GATES_DIR / f"{editor.fingerprint}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    gate.save(out, editor.fingerprint)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
