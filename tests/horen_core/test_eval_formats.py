"""`horen eval` data formats: KnowEdit, UnKE and ROME CounterFact records load with their specificity, portability
and sub-questions, bad records name themselves in the error; ROUGE-L and BLEU on known cases."""

from __future__ import annotations

import json

import pytest

from horen_core.evaluate import bleu, detect_format, distinct_trigrams, load_records, rouge_l

KNOWEDIT = {
    "subject": "Aram Arman",
    "prompt": "The occupation of Aram Arman is",
    "target_new": "painter",
    "portability": {"Subject_Aliasing": [{"prompt": "The occupation of A. Arman is", "ground_truth": [["painter"]]}]},
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The gender of Aram Arman is", "ground_truth": [["male"]]},
            {"prompt": "The place of birth of Aram Arman is", "ground_truth": [["Iskenderun"]]},
        ]
    },
}
UNKE = {
    "id": 0,
    "question": "What is George Rankin's occupation?",
    "para_question": "What does George Rankin do for a living?",
    "answer": "George Rankin has been involved in politics for over a decade.",
    "sub_question": ["How long has George Rankin been involved in politics?"],
    "sub_answer": ["Over a decade."],
}


ROME = {
    "case_id": 626,
    "requested_rewrite": {
        "prompt": "{} specializes in",
        "relation_id": "P101",
        "target_new": {"str": "physiology", "id": "Q521"},
        "target_true": {"str": "terrorism", "id": "Q7283"},
        "subject": "suicide attack",
    },
    "paraphrase_prompts": ["2003. suicide attack works in the area of", "The domain of work of suicide attack is"],
    "neighborhood_prompts": ["The expertise of SPECTRE is", "Yakub Memon specializes in"],
    "generation_prompts": ["suicide attack is known for"],
}


def write(tmp_path, rows):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return path


def test_knowedit_records_load_with_specificity_and_portability(tmp_path):
    rows = [KNOWEDIT]
    assert detect_format(rows) == "knowedit"
    (rec,) = load_records(write(tmp_path, rows))
    assert rec.prompt == KNOWEDIT["prompt"] and rec.target == "painter"
    assert rec.specificity == ("The gender of Aram Arman is", "The place of birth of Aram Arman is")
    assert rec.portability == (("The occupation of A. Arman is", "painter"),)
    assert rec.rephrase == "The occupation of A. Arman is"  # the subject alias stands in for a rephrase
    assert rec.subject == "Aram Arman"


def test_unke_records_load_with_sub_questions(tmp_path):
    (rec,) = load_records(write(tmp_path, [UNKE]))
    assert (rec.prompt, rec.rephrase, rec.target) == (UNKE["question"], UNKE["para_question"], UNKE["answer"])
    assert rec.sub_questions == (("How long has George Rankin been involved in politics?", "Over a decade."),)


def test_rome_counterfact_records_load_with_paraphrase_and_neighbour(tmp_path):
    assert detect_format([ROME]) == "rome"
    (rec,) = load_records(write(tmp_path, [ROME]))
    assert (rec.prompt, rec.target) == ("suicide attack specializes in", "physiology")
    assert rec.rephrase == "2003. suicide attack works in the area of"
    assert (rec.loc_prompt, rec.loc_answer) == ("The expertise of SPECTRE is", "terrorism")
    assert rec.subject == "suicide attack"


def test_an_offset_past_the_last_record_is_an_error_not_an_empty_run(tmp_path):
    path = write(tmp_path, [UNKE, UNKE])
    assert len(load_records(path, offset=1)) == 1
    with pytest.raises(ValueError, match="offset 2 is outside its 2 records"):
        load_records(path, offset=2)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("Who wrote Hamlet?\tShakespeare\n")
    with pytest.raises(ValueError, match="offset 1 is outside its 1 records"):
        load_records(pairs, offset=1)


def test_bad_records_give_a_clear_error(tmp_path):
    broken = dict(UNKE)
    del broken["answer"]
    with pytest.raises(ValueError, match="record 1 is not a valid unke record"):
        load_records(write(tmp_path, [UNKE, broken]), fmt="unke")
    with pytest.raises(ValueError, match="record 0 has an empty prompt or target"):
        load_records(write(tmp_path, [{**KNOWEDIT, "target_new": " "}]))
    with pytest.raises(ValueError, match="unknown data format"):
        load_records(write(tmp_path, [{"text": "x"}]))
    with pytest.raises(ValueError, match="JSON list"):
        load_records(write(tmp_path, {"prompt": "x"}))


def test_text_metrics():
    ref = "george rankin has been involved in politics for over a decade"
    assert rouge_l(ref, ref) == pytest.approx(1.0)
    assert bleu(ref, ref) == pytest.approx(1.0)
    assert rouge_l(ref, "an entirely different sentence") == 0.0
    assert bleu(ref, "an entirely different sentence") == 0.0
    assert 0.0 < rouge_l(ref, "george rankin was in politics") < 1.0
    assert distinct_trigrams("a b c a b c a b c a b c") < 0.5 < distinct_trigrams(ref)


def test_user_scores_on_a_tiny_model(tiny_llama, make_editor):
    from horen_core import HorenConfig
    from horen_core.evaluate import EditRecord, summarize_user, user_baseline, user_scores

    editor = make_editor(*tiny_llama, HorenConfig(layer=1))
    records = [
        EditRecord(
            "the capital of France is",
            "Rome",
            "what is the capital of France ?",
            "the river of Egypt is",
            "Cairo",
            specificity=("the language of France is",),
            portability=(("the capital city of France is", "Rome"),),
        ),
        EditRecord("where was Bob born ?", "Lima", None, None, None),
    ]
    base = user_baseline(editor, records, chat=False)
    for r in records:
        editor.edit(r.prompt, r.target)
    rows = user_scores(editor, records, base, chat=False)
    assert [r["rewrite_contains"] for r in rows] == [1.0, 1.0]
    assert set(rows[0]) >= {"rephrase_contains", "locality_free", "specificity", "portability", "fluency"}
    assert "specificity" not in rows[1] and "rephrase_contains" not in rows[1]
    summary = summarize_user(rows, base)
    assert summary["rewrite_contains"] == 1.0 and summary["fluency_ratio"] > 0


def test_horen_eval_names_a_missing_or_bad_data_file_without_a_traceback(tmp_path):
    from horen_core.cli import eval_main

    with pytest.raises(SystemExit, match="horen eval: .*No such file"):
        eval_main(["--data", str(tmp_path / "missing.json")])
    broken = dict(UNKE)
    del broken["answer"]
    with pytest.raises(SystemExit, match="record 0 is not a valid unke record"):
        eval_main(["--data", str(write(tmp_path, [broken])), "--format", "unke"])
