"""Tests for vqa_metric: official VQA v2 normalisation, scoring, aggregation and the evaluate wrapper.

Every expected value below was worked out by hand from the official vqaEval.py rules.
"""

import sys
from pathlib import Path

import datasets
import evaluate
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

METRIC_PATH = Path(__file__).resolve().parents[1] / "vqa_metric.py"
if str(METRIC_PATH.parent) not in sys.path:
    sys.path.insert(0, str(METRIC_PATH.parent))

from vqa_metric import VqaAccuracy, normalize_answer, vqa_accuracy, vqa_score  # noqa: E402


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes.", "yes"),
        ("  Yes  ", "yes"),
        ("two", "2"),
        ("Ten", "10"),
        ("None", "0"),
        ("the dog", "dog"),
        ("A Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("whats", "what's"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("'ow'sat", "'ow's'at"),
        # Official quirks: "Im" is an upper-case key, never reached after lowercasing,
        # and "somebody'd" is mapped backwards.
        ("im", "im"),
        ("somebody'd", "somebodyd"),
        # A period survives only when a digit follows it.
        ("2.5", "2.5"),
        ("5.", "5"),
        ("U.S.A.", "usa"),
        # A digit-comma-digit group deletes every punctuation mark in the text.
        ("1,000", "1000"),
        ("1,000 t-shirts", "1000 tshirts"),
        # Otherwise a mark becomes a space, unless one of its occurrences touches a space.
        ("t-shirt", "t shirt"),
        ("t-shirt - blue", "tshirt blue"),
        # One side touching a space is enough; newlines and tabs count as spaces there.
        ("t-shirt -blue", "tshirt blue"),
        ("t-shirt- blue", "tshirt blue"),
        ("t-shirt\n-blue", "tshirt blue"),
        ("t-shirt\t-blue", "tshirt blue"),
        ("red, white", "red white"),
        ("yes!", "yes"),
        ("(yes)", "yes"),
        ("1/2", "1 2"),
        ("line\nbreak\tand  tab", "line break and tab"),
        ("", ""),
        ("the", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("Yes.", "yes"),
        ("two", "2"),
        ("the dog", "dog"),
        ("dont", "don't"),
        ("2.5", "2.5"),
        ("1000", "1,000"),
        ("t shirt", "t-shirt"),
        ("yes", "yes!"),
        ("tennis\n", "\ttennis"),
    ],
)
def test_equivalent_answers_score_full(prediction: str, answer: str) -> None:
    assert vqa_score(prediction, [answer] * 10) == 1.0


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [("25", "2.5"), ("tshirt", "t-shirt"), ("no", "yes"), ("im", "i'm")],
)
def test_different_answers_score_zero(prediction: str, answer: str) -> None:
    assert vqa_score(prediction, [answer] * 10) == 0.0


@pytest.mark.parametrize(
    ("agreeing", "expected"),
    [(0, 0.0), (1, 30.0), (2, 60.0), (3, 90.0), (4, 100.0), (5, 100.0), (6, 100.0),
     (7, 100.0), (8, 100.0), (9, 100.0), (10, 100.0)],
)
def test_accuracy_by_number_of_agreeing_annotators(agreeing: int, expected: float) -> None:
    answers = ["yes"] * agreeing + ["no"] * (10 - agreeing)
    assert vqa_accuracy(["yes"], [answers]) == {"vqa_accuracy": expected}


def test_score_with_fewer_than_ten_answers() -> None:
    # Leaving out the one match leaves 0 matches; leaving out either other answer leaves 1.
    assert vqa_score("red", ["red", "blue", "green"]) == pytest.approx((0 + 1 / 3 + 1 / 3) / 3)
    # With a single answer, leaving it out leaves nothing to agree with.
    assert vqa_score("red", ["red"]) == 0.0


def test_score_rejects_empty_or_bare_string_answers() -> None:
    with pytest.raises(ValueError, match="^answers is empty: VQA accuracy needs at least one human answer$"):
        vqa_score("yes", [])
    with pytest.raises(TypeError, match="^answers must be a sequence of answer strings, not a single string$"):
        vqa_score("yes", "yes")


PREDICTIONS = ["yes", "no", "two", "red"]
ANSWERS = [
    ["yes"] * 10,                 # 100
    ["yes"] * 10,                 # 0
    ["2"] * 2 + ["3"] * 8,        # 60
    ["red"] + ["blue"] * 9,       # 30
]
TYPES = ["yes/no", "yes/no", "number", "other"]
EXPECTED = {
    "vqa_accuracy": 47.5,         # (100 + 0 + 60 + 30) / 4
    "vqa_accuracy_yes_no": 50.0,
    "vqa_accuracy_number": 60.0,
    "vqa_accuracy_other": 30.0,
}


def test_accuracy_per_answer_type() -> None:
    assert vqa_accuracy(PREDICTIONS, ANSWERS, TYPES) == EXPECTED


def test_accuracy_reports_only_types_present_and_skips_untyped() -> None:
    result = vqa_accuracy(PREDICTIONS, ANSWERS, ["yes/no", "yes/no", None, None])
    assert result == {"vqa_accuracy": 47.5, "vqa_accuracy_yes_no": 50.0}


def test_accuracy_rounds_to_two_decimals() -> None:
    assert vqa_accuracy(["cat", "dog", "cow"], [["cat"] * 10, ["pig"] * 10, ["pig"] * 10]) == {"vqa_accuracy": 33.33}


def test_accuracy_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match=r"2 predictions but 1 answer lists"):
        vqa_accuracy(["yes", "no"], [["yes"] * 10])
    with pytest.raises(ValueError, match=r"1 predictions but 2 answer types"):
        vqa_accuracy(["yes"], [["yes"] * 10], ["yes/no", "other"])


def test_accuracy_reports_every_answer_type_it_finds() -> None:
    # VizWiz's "unanswerable" and GQA-style structural types are grouped like VQA v2's three.
    result = vqa_accuracy(
        ["unanswerable", "red", "yes", "no"],
        [["unanswerable"] * 10, ["blue"] * 10, ["yes"] * 10, ["yes"] * 10],
        ["unanswerable", "Query Attr", "yes/no", "yes/no"],
    )
    assert result == {
        "vqa_accuracy": 50.0,
        "vqa_accuracy_unanswerable": 100.0,
        "vqa_accuracy_query_attr": 0.0,
        "vqa_accuracy_yes_no": 50.0,
    }


def test_accuracy_refuses_answer_types_that_share_a_metric_name() -> None:
    with pytest.raises(ValueError, match="'yes/no' and 'yes no'"):
        vqa_accuracy(["yes", "no"], [["yes"] * 10, ["no"] * 10], ["yes/no", "yes no"])
    with pytest.raises(ValueError, match=r"'\?\?'"):
        vqa_accuracy(["yes"], [["yes"] * 10], ["??"])


def test_accuracy_rejects_empty_input() -> None:
    with pytest.raises(ValueError, match="^no predictions: VQA accuracy is undefined on an empty set$"):
        vqa_accuracy([], [])


def test_evaluate_load_matches_vqa_accuracy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    metric = evaluate.load(str(METRIC_PATH), cache_dir=str(tmp_path))

    typed = metric.compute(predictions=PREDICTIONS, references=ANSWERS, answer_types=TYPES)
    assert typed == EXPECTED == vqa_accuracy(PREDICTIONS, ANSWERS, TYPES)

    untyped = metric.compute(predictions=PREDICTIONS, references=ANSWERS)
    assert untyped == {"vqa_accuracy": 47.5}


def test_metric_class_computes_in_process_with_the_declared_inputs() -> None:
    """The `evaluate` module's class itself, as `evaluate.load` builds it: its features and its result."""
    metric = VqaAccuracy()
    assert metric.features == datasets.Features(
        {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
    )
    assert metric.reference_urls == ["https://visualqa.org/evaluation.html"]
    assert "goyal2017making" in metric.citation
    assert metric.compute(predictions=PREDICTIONS, references=ANSWERS, answer_types=TYPES) == EXPECTED
    assert metric.compute(predictions=PREDICTIONS, references=ANSWERS) == {"vqa_accuracy": 47.5}


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_normalize_answer_is_total_idempotent_and_tidy(text: str) -> None:
    normalized = normalize_answer(text)
    assert isinstance(normalized, str)
    assert normalize_answer(normalized) == normalized
    assert normalized == normalized.strip()
    assert "  " not in normalized


@settings(max_examples=200, deadline=None)
@given(st.text(), st.lists(st.text(), min_size=1, max_size=12))
def test_vqa_score_is_in_unit_interval(prediction: str, answers: list[str]) -> None:
    assert 0.0 <= vqa_score(prediction, answers) <= 1.0
