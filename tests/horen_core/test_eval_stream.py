"""The edit stream of a large `horen eval`: prompt<TAB>target files, several files mixed in one fixed
order without repeated prompts, generated filler facts, the scored sample, baselines kept per record,
and a run that saves its progress and resumes it (tiny model)."""

from __future__ import annotations

import json

import pytest

from horen_core.config import HorenConfig
from horen_core.evaluate import EditRecord, load_records, user_baseline
from horen_core.stream import GENERATED, Baselines, generated_facts, mixed_stream, sample


def zsre(src: str, answer: str, rephrase: str, loc: str = "where is Lima ?", loc_ans: str = "Peru") -> dict:
    return {"src": src, "answers": [answer], "rephrase": rephrase, "loc": loc, "loc_ans": loc_ans, "alt": answer}


def test_pairs_file_skips_empty_targets_and_names_a_bad_line(tmp_path):
    good = tmp_path / "pairs.tsv"
    good.write_text("Who wrote Hamlet?\tMarlowe\nWhat gender is X?\t\nWhere is Oslo?\tPeru\n")
    records = load_records(good)
    assert [(r.prompt, r.target) for r in records] == [("Who wrote Hamlet?", "Marlowe"), ("Where is Oslo?", "Peru")]
    assert records[0].rephrase is None and records[0].loc_prompt is None
    bad = tmp_path / "bad.tsv"
    bad.write_text("Who wrote Hamlet?\tMarlowe\nno tab here\n")
    with pytest.raises(ValueError, match="line 2"):
        load_records(bad)


def test_mixed_stream_is_fixed_by_its_seed_and_drops_repeated_prompts(tmp_path):
    a = tmp_path / "a.tsv"
    a.write_text("".join(f"What is fact {i}?\tanswer {i}\n" for i in range(20)))
    b = tmp_path / "b.json"
    rows = [zsre(f"Who is person {i}?", f"name {i}", f"Person {i} is who?") for i in range(20)]
    rows.append(zsre("what IS  fact 3?", "another answer", "fact three?"))  # asks a's fact 3 again
    b.write_text(json.dumps(rows))
    first, dropped = mixed_stream([str(a), str(b)], seed=1)
    again, _ = mixed_stream([str(a), str(b)], seed=1)
    other, _ = mixed_stream([str(a), str(b)], seed=2)
    assert dropped == 1 and len(first) == 40
    assert first == again and first != other
    assert {r.source for r in first} == {"a", "b"}
    assert [r.source for r in first[:20]].count("a") not in (0, 20)  # the files are interleaved
    assert len({" ".join(r.prompt.lower().split()) for r in first}) == 40


def test_generated_facts_are_distinct_and_never_sampled():
    facts = generated_facts(300, seed=0)
    assert facts == generated_facts(300, seed=0)
    assert len({f.prompt for f in facts}) == 300
    assert all(f.source == GENERATED and f.subject and f.subject in f.prompt for f in facts)
    real = [EditRecord(f"q{i}", "t", None, None, None) for i in range(10)]
    stream = real + facts
    assert sorted(sample(stream, len(stream), 0)) == list(range(10))


def test_sample_is_the_same_for_a_longer_stream_and_within_the_edits_made():
    records = [EditRecord(f"q{i}", "t", None, None, None) for i in range(500)]
    at_200 = sample(records, 200, 50, seed=3)
    assert len(at_200) == 50 and all(i < 200 for i in at_200)
    assert sample(records[:300], 200, 50, seed=3) == at_200  # resuming a longer stream scores the same
    assert sample(records, 200, 50, seed=4) != at_200
    assert sorted(sample(records, 30, 50, seed=3)) == list(range(30))


def test_baselines_kept_per_record_equal_one_call(tiny_llama, make_editor):
    model, tok = tiny_llama
    editor = make_editor(model, tok, HorenConfig(layer=1))
    records = [
        EditRecord("where is Paris ?", "Italy", None, "who is Alice ?", "Bob", specificity=("where is Rome ?",)),
        EditRecord("where is Oslo ?", "Spain", None, None, None),
        EditRecord("what is the capital of Peru ?", "Lima", None, "where is Lima ?", "Peru"),
        EditRecord(
            "who plays piano ?", "Carol", None, None, None, specificity=("who plays golf ?", "who plays chess ?")
        ),
    ]
    base = Baselines(editor, records, chat=False)
    base.user([2, 0])  # computed in another order and in parts
    joined = base.user([0, 1, 2, 3])
    assert joined == user_baseline(editor, records, chat=False)
    with editor.unedited():
        from horen_core.evaluate import LOCAL_TOKENS, answers, locality_outputs

        assert base.locality([3, 2, 0]) == [locality_outputs(editor, records)[i] for i in (3, 2, 0)]
        spec = [
            g.token_ids
            for g in answers(editor, ["who plays golf ?", "who plays chess ?", "where is Rome ?"], LOCAL_TOKENS)
        ]
    base.specificity([0])
    assert base.specificity([3, 1, 0]) == spec  # records without specificity prompts add nothing


def test_specificity_is_scored_over_every_prompt(tiny_llama, make_editor):
    """``specificity_summary``: a specificity prompt routed to an edit and answered otherwise counts
    as changed and routed; one the edits leave alone, as neither."""
    from horen_core.evaluate import LOCAL_TOKENS, answers, specificity_summary

    model, tok = tiny_llama
    editor = make_editor(model, tok, HorenConfig(layer=1, lr=1.0, stop_loss=0.3, relation_gate=False))
    edited, other = "Alice plays the game of", "the river in Cairo is"
    records = [EditRecord("x", "y", None, None, None, specificity=(edited, other))]
    with editor.unedited():
        before = [g.token_ids for g in answers(editor, [edited, other], LOCAL_TOKENS)]
    assert specificity_summary(editor, records, before)["relation_specificity"] == 1.0
    editor.edit(edited, "chess", subject="Alice")
    got = specificity_summary(editor, records, before)
    assert got == {"relation_specificity": 0.5, "relation_specificity_routed": 0.5, "relation_specificity_prompts": 2}


def test_eval_saves_progress_and_a_longer_run_resumes_it(tmp_path, tiny_llama):
    from horen_core.cli import eval_main

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    names = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
    cities = ["Paris", "Rome", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Oslo", "Tokyo", "Lima"]
    rows = [zsre(f"where was {n} born ?", c, f"where did {n} get born ?") for n, c in zip(names, cities)]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    common = ["--model", str(tmp_path / "model"), "--data", str(data), "--no-user-metrics", "--batch", "2"]
    common += ["--layer", "1", "--lr", "1.0", "--stop-loss", "0.3", "--max-steps", "50"]
    common += ["--state", str(tmp_path / "state"), "--output", str(tmp_path / "out.json"), "--converted-dir", ""]
    assert eval_main([*common, "--n", "6", "--checkpoints", "3"]) == 0
    first = json.loads((tmp_path / "out.json").read_text())
    assert set(first["checkpoints"]) == {"3", "6"}
    assert eval_main([*common, "--n", "10", "--checkpoints", "3,8"]) == 0
    second = json.loads((tmp_path / "out.json").read_text())
    assert set(second["checkpoints"]) == {"3", "6", "8", "10"}
    assert second["checkpoints"]["6"] == first["checkpoints"]["6"]  # carried over, not re-run
    assert second["summary"]["n"] == 10 and len(second["records"]) == 10
    # each edited prompt is routed to its own edit's entry (edit ids carried over from the saved run)
    assert second["summary"]["rewrite_routes"]["own"] == 1.0
    assert all(r["rewrite_route"] == "own" for r in second["records"])
    assert len(second["checkpoints"]["8"]) and second["summary"]["keys"] >= first["summary"]["keys"]
    rows[0] = zsre("where was Alice born ?", "Quito", "where did Alice get born ?")
    data.write_text(json.dumps(rows))  # another stream: refused, not mixed with the saved one
    with pytest.raises(SystemExit, match="another stream"):
        eval_main([*common, "--n", "10"])


def test_a_routed_locality_prompt_says_whether_it_names_the_edit_it_reads(tiny_llama, make_editor):
    """A locality prompt routed to another edit is ``named`` where that edit's subject is in the
    prompt (its own fact was edited too) and ``other`` where it is not: a collision."""
    from horen_core.evaluate import routes, summarize_routes

    model, tokenizer = tiny_llama
    editor = make_editor(model, tokenizer, HorenConfig(layer=1, lr=1.0, stop_loss=0.3, relation_gate=False))
    alice = editor.edit("Alice plays the game of", "chess", subject="Alice").edit_id
    bob = editor.edit("the river in Cairo is", "Nile", subject="").edit_id
    records = [
        # its locality prompt is Bob's edited prompt (no subject): a collision
        EditRecord("Alice plays the game of", "chess", None, "the river in Cairo is", "x"),
        # its locality prompt is Alice's edited prompt, which names her: rightly routed
        EditRecord("the river in Cairo is", "Nile", None, "Alice plays the game of", "x"),
    ]
    rows = routes(editor, records, [alice, bob])
    assert [r["locality_route"] for r in rows] == ["other", "named"]
    assert [r["rewrite_route"] for r in rows] == ["own", "own"]
    assert summarize_routes(rows)["locality_routes"] == {"own": 0.0, "other": 0.5, "none": 0.0, "named": 0.5}
    gone = routes(editor, records, [None, bob])  # a record whose edit is gone is not routed at all
    assert "locality_route" not in gone[0] and gone[1]["locality_route"] == "named"
