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


def mentions(subject: str, text: str) -> bool:
    """Whether ``text`` mentions ``subject`` as whole words (case and runs of whitespace ignored:
    "Berg Municipality" is not in "Sundbyberg Municipality"); an empty subject is mentioned
    everywhere."""
    if not subject:
        return True
    s, t = normalise(subject), normalise(text)
    at = t.find(s)
    while at >= 0:
        end = at + len(s)
        if (at == 0 or not t[at - 1].isalnum()) and (end == len(t) or not t[end].isalnum()):
            return True
        at = t.find(s, at + 1)
    return False


def resolve_subject(question: str, subject: str | None) -> str:
    """The subject an edit is stored with: the given one (stripped; "" means none), else inferred."""
    if subject is not None:
        return subject.strip()
    return infer_subject(question) or ""


_RUN = re.compile(r"\w+")


class SubjectIndex:
    """Which edits' subjects a text names, without testing every subject: each subject is filed
    under its first word, and a text's words pick the subjects that may start there, confirmed with
    ``mentions``. A subject is found only where it starts a word ("Paris" in "Paris, France", not
    in "Parisian"); a subject with no word characters is never found."""

    def __init__(self, subjects: dict[int, str] | None = None) -> None:
        self._by_word: dict[str, dict[int, str]] = {}
        for edit_id, subject in (subjects or {}).items():
            self.add(edit_id, subject)

    @staticmethod
    def _first_word(subject: str) -> str | None:
        m = _RUN.search(normalise(subject))
        return m.group() if m else None

    def add(self, edit_id: int, subject: str) -> None:
        word = self._first_word(subject)
        if word is not None:
            self._by_word.setdefault(word, {})[edit_id] = subject

    def discard(self, edit_id: int, subject: str) -> None:
        word = self._first_word(subject)
        edits = self._by_word.get(word) if word is not None else None
        if edits is not None:
            edits.pop(edit_id, None)
            if not edits:
                del self._by_word[word]

    def named(self, text: str) -> list[int]:
        """The edit ids whose subject ``text`` mentions, each once."""
        norm = normalise(text)
        found: list[int] = []
        for word in dict.fromkeys(_RUN.findall(norm)):
            for edit_id, subject in self._by_word.get(word, {}).items():
                if mentions(subject, norm):
                    found.append(edit_id)
        return found


# words that rule out what follows them ("which is not geohasher", "other than Paris")
_NEGATIONS = r"(?:(?<![\w'])(?:not|never|other than|besides|except|apart from|excluding|rather than|instead of)|n't)"


def _plain(text: str) -> str:
    return normalise(text.replace("’", "'"))


def rules_out(target: str, text: str) -> bool:
    """Whether ``text`` rules ``target`` out: a negation right before it ("The occupation of X,
    which is not geohasher, is"; "not a", "not the" allowed between), case and spacing ignored,
    the target as whole words."""
    t = _plain(target)
    if not t:
        return False
    pattern = _NEGATIONS + r"\s+(?:(?:a|an|the)\s+)?" + re.escape(t) + r"(?!\w)"
    return re.search(pattern, _plain(text)) is not None
