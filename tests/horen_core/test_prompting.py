"""Prompt formats on a tiny model with a ChatML template: the question span of plain and
chat-formatted prompts, the format an edit's prompt resolves to, and the hand-over of a routed
generation to the unedited model once the edit's target has been stated."""

from __future__ import annotations

import copy

import pytest

from horen_core import HorenConfig
from horen_core.errors import InvalidInputError
from horen_core.prompting import ChatFormat, resolve_question

# ChatML's shape in the tiny vocabulary: [PAD] opens a message, [EOS] closes it, roles are words
CHATML = (
    "{{ '[PAD] who Alice [EOS] ' }}{% for m in messages %}"
    "{{ '[PAD] ' + ('what' if m['role'] == 'user' else 'how') + ' ' + m['content'] + ' [EOS] ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[PAD] how ' }}{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    return tok


def test_chat_format_finds_the_question_span(chat_tokenizer):
    chat = ChatFormat(chat_tokenizer)
    assert chat.available
    r = chat.render("the capital of France is")
    assert chat_tokenizer.decode(r.ids[r.start : r.end]) == "the capital of France is"
    assert chat.span(r.ids) == (r.start, r.end)
    text = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": "who wrote the capital of France is"}], tokenize=False, add_generation_prompt=True
    )
    ids = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
    a, b = chat.span(ids)
    assert chat_tokenizer.decode(ids[a:b]) == "who wrote the capital of France is"
    plain = chat_tokenizer("the capital of France is")["input_ids"]
    assert chat.span(plain) == (0, len(plain))


def test_resolve_question_formats(chat_tokenizer, tiny_tokenizer):
    chat = ChatFormat(chat_tokenizer)
    text = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": "the capital of France is"}], tokenize=False, add_generation_prompt=True
    )
    assert resolve_question(chat, text, "auto") == ("the capital of France is", "chat")
    assert resolve_question(chat, "the capital of France is", "auto") == ("the capital of France is", "plain")
    assert resolve_question(chat, "the capital of France is", "chat") == ("the capital of France is", "chat")
    assert resolve_question(chat, text, "plain") == (text, "plain")
    with pytest.raises(InvalidInputError):
        resolve_question(chat, "x", "markdown")
    bare = ChatFormat(tiny_tokenizer)
    assert not bare.available
    with pytest.raises(InvalidInputError, match="no chat template"):
        resolve_question(bare, "the capital of France is", "chat")


def test_a_plain_edit_routes_its_chat_formatted_question(tiny_llama, chat_tokenizer, make_editor):
    model, _ = tiny_llama
    editor = make_editor(model, chat_tokenizer, HorenConfig(layer=1))
    res = editor.edit("the capital of France is", "Rome")
    chat_ids = editor.chat.render("the capital of France is").ids
    got = editor.generate([chat_ids], max_new_tokens=2)[0]
    assert got.entry_id == res.entry_id and got.score > editor.config.threshold


def test_a_routed_row_is_handed_to_the_unedited_model_after_its_target(tiny_llama, make_editor):
    model, tok = tiny_llama
    editor = make_editor(model, tok, HorenConfig(layer=1))
    prompt = "where was Bob born ?"
    res = editor.edit(prompt, "Lima")
    n = len(res.answer) + 6
    got = editor.generate([prompt], max_new_tokens=n, min_new_tokens=n)[0]
    assert got.entry_id == res.entry_id
    assert got.token_ids[: len(res.answer)] == list(res.answer)
    # what follows the target is the unedited model's own continuation of prompt + target
    ids = editor.encode_prompt(prompt) + list(res.answer)
    rest = n - len(res.answer)
    with editor.unedited():
        unedited = editor.generate([ids], max_new_tokens=rest, min_new_tokens=rest)[0]
    assert got.token_ids[len(res.answer) :] == unedited.token_ids
    # and differs from letting the value run on, so the hand-over is what made it so
    with editor.lock:
        from horen_core.generation import pad_left
        from horen_core.layer import activate

        ids_t, mask = pad_left([editor.encode_prompt(prompt)], editor.tokenizer.pad_token_id, editor.input_device)
        with activate(editor.routing.route_plan(mask)):
            raw = editor.model.generate(
                input_ids=ids_t,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )[0, ids_t.shape[1] :].tolist()
    assert raw[: len(res.answer)] == list(res.answer)
    assert raw != got.token_ids


def test_a_routed_row_that_never_states_its_target_is_answered_unedited(tiny_llama, make_editor):
    model, tok = tiny_llama
    editor = make_editor(model, tok, HorenConfig(layer=1))
    prompt = "where was Bob born ?"
    res = editor.edit(prompt, "Lima")
    # an answer the routed text cannot contain (words outside the tiny vocabulary decode to [UNK])
    editor.codebook.entry(res.entry_id).answer = tuple(tok("[UNK] [UNK] [UNK]", add_special_tokens=False)["input_ids"])
    n = 16
    got = editor.generate([prompt], max_new_tokens=n, min_new_tokens=n)[0]
    with editor.unedited():
        unedited = editor.generate([prompt], max_new_tokens=n, min_new_tokens=n)[0]
    assert got.entry_id == res.entry_id, "the prompt is still routed to the edit"
    assert got.token_ids == unedited.token_ids
    assert got.token_ids[:1] != [tok.convert_tokens_to_ids("Lima")], "the value alone would have said Lima"


def test_the_text_after_a_stated_target_starts_a_new_word(tiny_tokenizer, make_editor):
    """The hand-over's first token may not extend the target's last word ("Lima" -> "Limao"), nor
    may its second after a lone dot ("Lima" -> "Lima.o")."""
    import torch

    from horen_core.generation import _WordEnds
    from tests.conftest import build_tiny_model

    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_tokens(["##o", "##s", "##-"])
    model = build_tiny_model("llama", len(tok))
    editor = make_editor(model, tok, HorenConfig(layer=1))
    flags, glue = editor.decoder.word_masks()
    pieces = {tok.convert_tokens_to_ids(t) for t in ("##o", "##s", "##-")}
    assert {int(i) for i in flags.nonzero()} == pieces, "only the word pieces extend a word (not '.' or '?')"
    lima = tok.convert_tokens_to_ids("Lima")
    assert editor.decoder.mid_word([0, 1, 2], {0: [lima], 1: [tok.convert_tokens_to_ids("?")], 2: [lima]}, {2}) == [0]
    scores = torch.zeros(2, flags.shape[0])
    dot = tok.convert_tokens_to_ids(".")
    assert {int(i) for i in glue.nonzero()} == {dot}
    ends = _WordEnds(flags, glue, width=5, rows=[1])
    out = ends(torch.zeros(2, 5, dtype=torch.long), scores.clone())
    assert torch.isinf(out[1, sorted(pieces)]).all() and not torch.isinf(out[0]).any() and not torch.isinf(out[1, lima])
    second = torch.zeros(2, 6, dtype=torch.long)
    assert not torch.isinf(ends(second, scores.clone())).any(), "a second token is free after a word"
    second[:, 5] = dot
    out = ends(second, scores.clone())
    assert torch.isinf(out[1, sorted(pieces)]).all() and not torch.isinf(out[0]).any(), "after a dot, only the rows"
    second = torch.zeros(2, 7, dtype=torch.long)
    second[:, 5:] = dot
    assert not torch.isinf(ends(second, scores.clone())).any(), "the first two tokens only"


def test_what_extends_a_word_after_a_stated_target():
    from horen_core.generation import _extends

    assert _extends("o") and _extends("-P") and _extends("'s") and _extends("’s")
    assert not any(_extends(t) for t in (" o", "\n", ".", ". ", ",", "'", "' ", "?", ""))


class _Pieces:
    """A tokenizer whose ids index a list of text pieces."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


@pytest.mark.parametrize(
    "pieces, start",
    [
        (["Wiley", " 2007", ".", " Pontus", " plays", " as"], 3),  # after ". "
        (["Category", ":", "X", "\n", "* ", "focaccia", " was", " from"], 4),  # after a line break
        (["It", " costs", " 3", ".", "5", " dollars"], 0),  # no space after the dot: one sentence
        (["Hi", ".", " Who", " won?"], 0),  # a last sentence under three tokens: the whole span
        (["Where", " is", " it", "?"], 0),
    ],
)
def test_last_sentence_start(pieces, start):
    from horen_core.prompting import last_sentence_start

    assert last_sentence_start(_Pieces(pieces), list(range(len(pieces))), 0, len(pieces)) == start


def test_a_long_form_answer_is_kept_when_it_is_not_stated_verbatim(tiny_llama, make_editor):
    """A routed row that never states a fact's target is answered unedited; a paragraph (over 12
    words), which one value carries only approximately, keeps the edited text."""
    model, tok = tiny_llama
    editor = make_editor(model, tok, HorenConfig(layer=1, max_steps=1))  # one step: not learnt verbatim
    prompt = "where was Bob born ?"
    long = "Bob was born in Lima . the city is in Peru . Bob plays chess and the piano in Lima"
    res = editor.edit(prompt, long)
    n = len(res.answer) + 12  # past the patience of a fact's row
    got = editor.generate([prompt], max_new_tokens=n)[0]
    assert got.entry_id == res.entry_id and long not in got.text
    with editor.unedited():
        unedited = editor.generate([prompt], max_new_tokens=n)[0]
    assert got.token_ids and got.token_ids != unedited.token_ids


def _repeats(answer: list[int], begins, opens) -> list[int]:
    """Positions where a token that begins a word completes a 4-token run seen earlier in ``answer``."""
    return [
        k
        for k in range(4, len(answer))
        if (begins[answer[k]] or opens[answer[k - 1]])
        and any(answer[j : j + 4] == answer[k - 3 : k + 1] for j in range(k - 3))
    ]


def test_the_text_after_a_stated_target_does_not_loop(tiny_tokenizer, make_editor):
    """After the target the unedited model may not complete a 4-token run its answer already holds
    with a token that begins a word; word pieces stay free, so a name is never misspelled."""
    import torch

    from horen_core.generation import _NoRepeat
    from tests.conftest import build_tiny_model

    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_tokens(["##o"])
    editor = make_editor(build_tiny_model("llama", len(tok)), tok, HorenConfig(layer=1))
    begins, opens = editor.decoder.word_edges()
    piece, eos, mark = tok.convert_tokens_to_ids("##o"), tok.eos_token_id, tok.convert_tokens_to_ids("?")
    a, b, c, d = tok("where was Bob born", add_special_tokens=False)["input_ids"]
    assert begins[a] and not begins[piece] and not begins[eos] and opens[mark] and not opens[a] and not opens[eos]
    guard = _NoRepeat(begins, opens, starts=[1, 1], rows=[0], n=4, tokenizer=tok)
    seen = torch.tensor([[eos, a, b, c, d, a, b, c], [eos, a, b, c, d, a, b, c]])
    out = guard(seen, torch.zeros(2, len(tok)))
    assert torch.isinf(out[0, d]) and torch.isinf(out[0]).sum() == 1, "only what completes the run, in its rows"
    assert not torch.isinf(out[1]).any()
    pieces = torch.tensor([[eos, a, b, c, piece, a, b, c]])
    assert not torch.isinf(guard(pieces, torch.zeros(1, len(tok)))).any(), "a word piece is never refused"
    after_mark = torch.tensor([[eos, a, b, mark, piece, a, b, mark]])
    assert torch.isinf(guard(after_mark, torch.zeros(1, len(tok)))[0, piece]), "after '?' a piece begins a word"
    before = _NoRepeat(begins, opens, starts=[5], rows=[0], n=4, tokenizer=tok)
    assert not torch.isinf(before(seen[:1], torch.zeros(1, len(tok)))).any(), "the prompt is not the answer"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_looping_continuation_is_kept_from_repeating(tiny_factory, tiny_tokenizer, make_editor, seed):
    """End to end on a random tiny model (whose own text loops): the answer after an edited fact
    holds no repeated run with the guard and does without it."""
    prompt, n = "where was Bob born ?", 40
    texts = {}
    for run in (0, 4):
        editor = make_editor(tiny_factory("llama", seed), tiny_tokenizer, HorenConfig(layer=1, repeat_guard=run))
        res = editor.edit(prompt, "Lima")
        got = editor.generate([prompt], max_new_tokens=n, min_new_tokens=n)[0]
        assert got.entry_id == res.entry_id and got.token_ids[: len(res.answer)] == list(res.answer)
        texts[run] = _repeats(got.token_ids, *editor.decoder.word_edges())
        editor.unwrap()
    assert texts[0], "the unguarded answer loops (what the guard is for)"
    assert not texts[4]
