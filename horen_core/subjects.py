"""An edit's subject: the name its prompt is about. A routed prompt gets an edit's value only when
it mentions that edit's subject, so a question about another entity whose key happens to be close
(CounterFact's neighbourhood prompts: "BBC Radio, by" after editing "BBC One, by") is answered by
the unedited model.

A subject given with the edit is used as it is; otherwise it is inferred from the question: its
longest run of capitalised words or numbers, holding at least one capitalised word (linking words
such as "of" or "de" inside a run), without a leading question word or a trailing possessive. A
question with no such run has no subject and its edit applies wherever its key routes.
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"\w[\w'’.\-]*")
# words that open a sentence with a capital without naming anything
_OPENERS = frozenset(
    "what when who whom whose where which how why the a an in on is was were are did does do tell name "
    "please of to for by at from and with as it this that i my".split()
)
# lowercase words that may sit inside a name ("Bank of America", "Leonardo da Vinci")
_LINKS = frozenset(
    "of the de del della di da do dos das du des la le les von van der den and & y al el bin ibn".split()
)


def infer_subject(question: str) -> str | None:
    """The question's longest run of capitalised words (see the module docstring), or None."""
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(question)]
    runs: list[list[int]] = []
    run: list[int] = []
    for i, (word, start, _) in enumerate(words):
        if run and question[words[i - 1][2] : start].strip():  # punctuation between two words ends a run
            runs.append(run)
            run = []
        named = word[0].isupper() or word[0].isdigit()
        if named and (run or word.lower() not in _OPENERS):
            run.append(i)
        elif run and word.lower() in _LINKS:
            run.append(i)
        else:
            if run:
                runs.append(run)
            run = []
    if run:
        runs.append(run)
    best = None
    for run in runs:
        while run and words[run[-1]][0].lower() in _LINKS:
            run = run[:-1]
        if any(words[i][0][0].isupper() for i in run):  # numbers alone name nothing
            text = re.sub(r"['’]s?$", "", question[words[run[0]][1] : words[run[-1]][2]].rstrip("."))
            if text and (best is None or len(text) > len(best)):
                best = text
    return best


def normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def fold(text: str) -> str:
    """``text`` as names are compared: case, accents and runs of whitespace ignored."""
    text = unicodedata.normalize("NFKD", text.replace("’", "'"))
    return normalise("".join(c for c in text if not unicodedata.combining(c)))


def variants(subject: str) -> list[str]:
    """The folded forms of a subject a text may use: as it is, and without its one-letter middle
    initials ("Tim J. Rankin" is also "Tim Rankin")."""
    whole = fold(subject)
    words = whole.split()
    bare = [w for i, w in enumerate(words) if not (0 < i < len(words) - 1 and len(w.rstrip(".")) == 1)]
    return [whole] if len(bare) == len(words) else [whole, " ".join(bare)]


def _mentioned(s: str, t: str) -> bool:
    """Whether the folded ``t`` holds the folded ``s`` as whole words."""
    at = t.find(s)
    while at >= 0:
        end = at + len(s)
        if (at == 0 or not t[at - 1].isalnum()) and (end == len(t) or not t[end].isalnum()):
            return True
        at = t.find(s, at + 1)
    return False


def mentions(subject: str, text: str) -> bool:
    """Whether ``text`` mentions ``subject`` (one of its ``variants``) as whole words, case, accents
    and spacing ignored ("Ruben Acosta" names "Rubén Acosta"; "Berg Municipality" is not in
    "Sundbyberg Municipality"); an empty subject is mentioned everywhere."""
    if not subject:
        return True
    t = fold(text)
    return any(_mentioned(s, t) for s in variants(subject))


def resolve_subject(question: str, subject: str | None) -> str:
    """The subject an edit is stored with: the given one (stripped; "" means none), else inferred."""
    if subject is not None:
        return subject.strip()
    return infer_subject(question) or ""


_RUN = re.compile(r"\w+")


class SubjectIndex:
    """Which edits' subjects a text names, without testing every subject: each subject is filed
    under the first word of each of its ``variants``, and a text's words pick the subjects that may
    start there, confirmed with ``mentions``. A subject is found only as whole words ("Paris" in
    "Paris, France", not in "Parisian"); a subject with no word characters is never found."""

    def __init__(self, subjects: dict[int, str] | None = None) -> None:
        self._by_word: dict[str, dict[int, str]] = {}
        for edit_id, subject in (subjects or {}).items():
            self.add(edit_id, subject)

    @staticmethod
    def _first_words(subject: str) -> set[str]:
        return {m.group() for v in variants(subject) if (m := _RUN.search(v))}

    def add(self, edit_id: int, subject: str) -> None:
        for word in self._first_words(subject):
            self._by_word.setdefault(word, {})[edit_id] = subject

    def discard(self, edit_id: int, subject: str) -> None:
        for word in self._first_words(subject):
            edits = self._by_word.get(word)
            if edits is not None:
                edits.pop(edit_id, None)
                if not edits:
                    del self._by_word[word]

    def named(self, text: str) -> list[int]:
        """The edit ids whose subject ``text`` mentions, each once."""
        folded = fold(text)
        found: dict[int, None] = {}
        for word in dict.fromkeys(_RUN.findall(folded)):
            for edit_id, subject in self._by_word.get(word, {}).items():
                if edit_id not in found and mentions(subject, folded):
                    found[edit_id] = None
        return list(found)


# words that rule out what follows them ("which is not geohasher", "other than Paris")
_NEGATIONS = r"(?:(?<![\w'])(?:not|never|other than|besides|except|apart from|excluding|rather than|instead of)|n't)"


def rules_out(target: str, text: str) -> bool:
    """Whether ``text`` rules ``target`` out: a negation right before it ("The occupation of X,
    which is not geohasher, is"; "not a", "not the" allowed between), case, accents and spacing
    ignored, the target as whole words."""
    t = fold(target)
    if not t:
        return False
    pattern = _NEGATIONS + r"\s+(?:(?:a|an|the)\s+)?" + re.escape(t) + r"(?!\w)"
    return re.search(pattern, fold(text)) is not None
