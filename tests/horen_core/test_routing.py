"""The editor's router: an attached candidate index first indexes the codebook, then gets exactly the
``CodebookChange``s the editor's mutations return (a load resets it), and routing asks it for
candidates with the retriever's support."""

from __future__ import annotations

import torch

from horen_core import CodebookChange, HorenConfig

CFG = HorenConfig(layer=1, max_steps=5)


class Recording:
    """A ``CandidateIndex`` that records what it is told and never narrows routing."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def reset(self, keys) -> None:
        self.calls.append(("reset", len(keys)))

    def apply(self, changes, keys) -> None:
        self.calls.append(("apply", list(changes), len(keys)))

    def candidates(self, queries: torch.Tensor, keys, support: int) -> None:
        self.calls.append(("candidates", queries.shape[0], support))

    def told(self, kind: str) -> list[tuple]:
        return [c[1:] for c in self.calls if c[0] == kind]


def test_every_codebook_change_reaches_the_attached_index(tiny_llama, make_editor, tmp_path):
    editor = make_editor(*tiny_llama, CFG)
    editor.edit("the capital of France is", "Rome")
    index = Recording()
    editor.attach_index(index)
    assert index.calls == [("reset", 1)]
    made = editor.edit("Alice plays", "chess")
    gone = editor.rollback(made.edit_id)
    trained = editor.train("who wrote", "Bob")
    mirrored = editor.apply_version(77, 50, trained.key, trained.value, trained.answer)
    replayed = editor.apply_versions(
        [78, 79], [60, 50], torch.stack([trained.key] * 2), torch.stack([trained.value] * 2), [[5], trained.answer]
    )
    assert index.told("apply") == [
        ([CodebookChange(made.edit_id, made.entry_id, "created")], 2),
        ([gone], 1),
        ([mirrored], 2),
        ([replayed[0]], 3),  # a run of new entries at once, then each retrain
        ([replayed[1]], 3),
    ]
    assert [c.kind for c in replayed] == ["created", "retrained"]
    editor.save(tmp_path / "cb.safetensors")
    editor.load(tmp_path / "cb.safetensors")
    assert index.calls[-1] == ("reset", 3)
    before = len(index.told("candidates"))
    editor.generate(["the capital of France is"], max_new_tokens=1)
    assert index.told("candidates")[before:] == [(1, CFG.hopfield_support)]
    editor.attach_index(None)
    editor.generate(["the capital of France is"], max_new_tokens=1)
    assert len(index.told("candidates")) == before + 1
