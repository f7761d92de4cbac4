"""The edit stream of a large `horen eval`: several data files mixed in one fixed order, generated
filler facts past the real records, the fixed random sample scored at each checkpoint, and the
unedited model's answers for that sample, computed once per record."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from horen_core.editor import HorenEditor
from horen_core.evaluate import LOCAL_TOKENS, EditRecord, answers, load_records, locality_outputs, user_baseline

GENERATED = "generated"  # the source of filler facts; never scored


def mixed_stream(paths: Sequence[str], fmt: str = "auto", target_field: str = "answers", seed: int = 0):
    """The records of every file, each tagged with its file's stem as ``source``, shuffled into one
    order fixed by ``seed``; a prompt asked earlier in the stream (case and spaces ignored) is
    dropped, so that no scored edit is overwritten by a later one. Returns (records, dropped)."""
    records: list[EditRecord] = []
    for path in paths:
        records += [
            replace(r, source=Path(path).stem)
            for r in load_records(path, fmt if len(paths) == 1 else "auto", target_field)
        ]
    random.Random(seed).shuffle(records)
    return dedupe(records)


def dedupe(records: Sequence[EditRecord]) -> tuple[list[EditRecord], int]:
    seen: set[str] = set()
    out = []
    for r in records:
        key = " ".join(r.prompt.lower().split())
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out, len(records) - len(out)


# invented subjects (two made-up words) under templated relations: facts no data set asks about
_SYLLABLES = ("bar", "ven", "tor", "lis", "mak", "quo", "dren", "sal", "fim", "rho", "gat", "nel", "zor", "pim", "kes")
_RELATIONS = (
    ("What is the capital of {}?", ("Marnet", "Oskova", "Tellavir", "Brunhold", "Pesca", "Quillan")),
    ("Who founded {}?", ("Ada Brenner", "Tomas Okafor", "Lena Varga", "Ivo Castell", "Mira Solberg")),
    ("Which language is spoken in {}?", ("Portuguese", "Finnish", "Tagalog", "Basque", "Swahili", "Welsh")),
    ("In which year was {} established?", tuple(str(y) for y in range(1710, 2010, 7))),
    ("What sport does {} play?", ("cricket", "curling", "handball", "fencing", "water polo", "rugby")),
    ("Which company makes the {}?", ("Halvorsen", "Nakamura Works", "Dellacroix", "Brightwell", "Ostrava Motors")),
    ("What instrument does {} play?", ("cello", "oboe", "banjo", "harp", "trombone", "sitar")),
    ("Where was {} born?", ("Lyon", "Tampere", "Cork", "Bergen", "Porto", "Graz", "Quito")),
)


def generated_facts(n: int, seed: int = 0) -> list[EditRecord]:
    """``n`` distinct filler facts: a templated relation about an invented subject, with a target
    drawn from that relation's answers (``source`` = ``GENERATED``)."""
    rng = random.Random(seed)
    out: list[EditRecord] = []
    seen: set[str] = set()
    while len(out) < n:
        name = " ".join(
            "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize() for _ in range(2)
        )
        template, answers = rng.choice(_RELATIONS)
        prompt = template.format(name)
        if prompt not in seen:
            seen.add(prompt)
            out.append(EditRecord(prompt, rng.choice(answers), None, None, None, subject=name, source=GENERATED))
    return out


def fingerprint(records: Sequence[EditRecord]) -> str:
    """A digest of the stream's prompts and targets, to resume only the same stream."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.prompt}\t{r.target}\n".encode())
    return h.hexdigest()[:16]


def sample(records: Sequence[EditRecord], done: int, k: int, seed: int = 0) -> list[int]:
    """The scored records after ``done`` edits: of the real (not generated) records among the
    first ``done``, the ``k`` first in one random order fixed by ``seed`` (all of them when ``k``
    is 0). A record's place in that order does not depend on the records after it, so a longer
    stream (a resumed run) scores the same records at the same checkpoint."""
    rng = random.Random(seed)
    rank = [rng.random() for _ in records]
    real = [i for i in range(min(done, len(records))) if records[i].source != GENERATED]
    real.sort(key=rank.__getitem__)
    return real[:k] if k else real


class Baselines:
    """The unedited model's answers that scoring compares against, for any records, computed the
    first time a record is scored and kept."""

    def __init__(self, editor: HorenEditor, records: Sequence[EditRecord], chat: bool) -> None:
        self.editor, self.records, self.chat = editor, records, chat
        self._loc: dict[int, list[int] | None] = {}
        self._user: dict[int, dict] = {}
        self._spec: dict[int, list[list[int]]] = {}

    def locality(self, idx: Sequence[int]) -> list[list[int] | None]:
        """``locality_outputs`` of the unedited model, aligned with ``idx``."""
        missing = [i for i in idx if i not in self._loc]
        if missing:
            with self.editor.unedited():
                got = locality_outputs(self.editor, [self.records[i] for i in missing])
            self._loc.update(zip(missing, got))
        return [self._loc[i] for i in idx]

    def specificity(self, idx: Sequence[int]) -> list[list[int]]:
        """The unedited model's ``LOCAL_TOKENS``-token answers to the specificity prompts of the
        records ``idx``, in their order, concatenated."""
        missing = [i for i in idx if i not in self._spec and self.records[i].specificity]
        if missing:
            prompts = [p for i in missing for p in self.records[i].specificity]
            with self.editor.unedited():
                got = iter(g.token_ids for g in answers(self.editor, prompts, LOCAL_TOKENS))
            for i in missing:
                self._spec[i] = [next(got) for _ in self.records[i].specificity]
        return [a for i in idx for a in self._spec.get(i, [])]

    def user(self, idx: Sequence[int]) -> dict:
        """``user_baseline`` of the records ``idx``, in their order."""
        missing = [i for i in idx if i not in self._user]
        if missing:
            base = user_baseline(self.editor, [self.records[i] for i in missing], self.chat)
            loc, spec = iter(base["loc"]), iter(base["spec"])
            for j, i in enumerate(missing):
                r = self.records[i]
                part = {
                    "loc": [next(loc)] if r.loc_prompt else [],
                    "spec": [next(spec) for _ in r.specificity],
                    "fluency": [base["fluency"][j]],
                }
                if "chat_ends" in base:
                    part["chat_ends"] = [base["chat_ends"][j]]
                self._user[i] = part
        out: dict[str, list] = {"loc": [], "spec": [], "fluency": []}
        if self.chat:
            out["chat_ends"] = []
        for i in idx:
            for key, values in self._user[i].items():
                out[key] += values
        return out
