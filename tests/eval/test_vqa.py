"""VQAv2 answer normalisation on hand-written cases and the leave-one-out accuracy on known examples."""
from __future__ import annotations

import pytest

from blip2fast.eval.vqa import (CONTRACTIONS, VQAConfig, normalize_answer, normalize_references, process_punctuation,
                                vqa_accuracy, vqa_score)


@pytest.mark.parametrize("raw, expected", [
    # numbers: words zero..ten and "none" become digits; other numbers stay words
    ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"), ("eleven", "eleven"), ("zero", "0"),
    # articles dropped, case folded, whitespace collapsed
    ("The Dog", "dog"), ("a red apple", "red apple"), ("an  owl\t", "owl"), ("A\nthe  cat", "cat"),
    # periods: removed unless a digit follows
    ("yes.", "yes"), ("2.5", "2.5"), ("3.", "3"), ("St. Louis", "st louis"), (".5", ".5"),
    # commas: a digit-comma-digit group deletes all listed punctuation; otherwise comma -> space
    ("100,978", "100978"), ("red,blue", "red blue"), ("red, blue", "red blue"), ("1,000 people", "1000 people"),
    # punctuation next to a space is deleted, otherwise replaced by a space
    ("yes!", "yes"), ("black-and-white", "black and white"), ("left / right", "left right"),
    ("t-shirt ?", "t shirt"), ("(maybe)", "maybe"),
    # apostrophes and colons are kept
    ("girl's", "girl's"), ("2:50 pm", "2:50 pm"),
    # contractions without their apostrophe get it back
    ("dont", "don't"), ("Isnt it", "isn't it"), ("wont", "won't"), ("youre", "you're"), ("oclock", "o'clock"),
    ("shouldnt've", "shouldn't've"), ("im", "im"),  # the official table only has "Im", never matched lower-cased
    ("its", "its"), ("lets", "lets"), ("hes", "he's"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_decision_is_made_on_the_input_text():
    # "-" has no space next to it, but "," does: each mark is decided on its own
    assert process_punctuation("a-b , c") == "a b  c"
    # a digit-comma-digit anywhere deletes every listed mark, even one with no space around it
    assert process_punctuation("1,5 x-y") == "15 xy"


def test_contraction_table_entries():
    assert CONTRACTIONS["cant"] == "can't" and CONTRACTIONS["yall"] == "y'all"
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # as the official table has it
    assert all(k == k.lower() for k in CONTRACTIONS)
    assert "shed" not in CONTRACTIONS and "well" not in CONTRACTIONS and "its" not in CONTRACTIONS


def test_references_processed_only_when_not_unanimous():
    assert normalize_references(["Yes!", "yes", "yes"]) == ["Yes ", "yes", "yes"]
    assert normalize_references(["Two!"] * 10) == ["Two!"] * 10  # unanimous: compared as given


def test_accuracy_leave_one_out_known_example():
    # 2 of 10 humans said "2": each of the 8 other subsets has 2 matches (2/3), the 2 subsets leaving out a "2"
    # have 1 match (1/3): (8 * 2/3 + 2 * 1/3) / 10 = 0.6
    answers = ["2", "2"] + ["3"] * 8
    assert vqa_accuracy("two", answers) == pytest.approx(0.6)
    # 3 humans: 7 subsets with 3 matches (1), 3 subsets with 2 matches (2/3): (7 + 2) / 10 = 0.9
    assert vqa_accuracy("2", ["2"] * 3 + ["4"] * 7) == pytest.approx(0.9)
    # 4 or more humans: every subset has >= 3 matches
    assert vqa_accuracy("2", ["2"] * 4 + ["4"] * 6) == 1.0
    # 1 human: 9 subsets with 1 match (1/3), 1 with none: 0.3
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("bird", ["cat"] + ["dog"] * 9) == 0.0
    # normalisation on both sides: "The dog." matches "dog" (references differ, so they are processed)
    assert vqa_accuracy("The dog.", ["dog"] * 5 + ["dog!"] + ["cat"] * 4) == 1.0


def test_unanimous_references_are_not_normalised():
    # the official quirk: unanimous references are compared as given, so "Two" never matches the prediction "2"
    assert vqa_accuracy("two", ["Two"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 1.0


def test_vqa_score_by_answer_type():
    anns = {1: {"answers": ["yes"] * 10, "answer_type": "yes/no"},
            2: {"answers": ["2", "2"] + ["3"] * 8, "answer_type": "number"},
            3: {"answers": ["red"] * 10, "answer_type": "other"}}
    s = vqa_score({1: "Yes", 2: "two", 3: "blue", 4: "extra"}, anns)
    assert s["n_questions"] == 3
    assert s["accuracy"] == pytest.approx((1 + 0.6 + 0) / 3)
    assert s["per_answer_type"] == pytest.approx({"number": 0.6, "other": 0.0, "yes/no": 1.0})
    with pytest.raises(ValueError, match="no prediction"):
        vqa_score({1: "yes"}, anns)


def test_config_checks():
    with pytest.raises(ValueError, match="must contain"):
        VQAConfig(prompt="Question: Answer:")
    cfg = VQAConfig()
    assert (cfg.num_beams, cfg.max_new_tokens, cfg.min_new_tokens, cfg.length_penalty) == (5, 10, 1, -1.0)
