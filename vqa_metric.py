"""VQA v2 accuracy, as computed by the official evaluation script (vqaEval.py).

The module is both a plain library (``normalize_answer``, ``vqa_score``,
``vqa_accuracy``) and a Hugging Face ``evaluate`` metric (``VqaAccuracy``), so it
can be loaded with ``evaluate.load("path/to/vqa_metric.py")``. For that reason it
imports only the standard library, ``datasets`` and ``evaluate``, and does nothing
at import time but define things.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import datasets
import evaluate

# Characters that the official processPunctuation deletes or turns into spaces.
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)"; its "(?!<=\d)" is a typo for a
# lookbehind and is in fact a lookahead that always succeeds before a ".", so a
# period is deleted exactly when it is not followed by a digit ("5." -> "5").
_PERIOD = re.compile(r"\.(?!\d)")

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions of the official map, in their apostrophe form. The official map sends
# every spelling that lacks exactly one of the apostrophes to this form (so
# "couldnt've" and "couldn'tve" give "couldn't've", but "couldntve" stays as is).
_CONTRACTED_FORMS = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't
    hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've
    it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock
    oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
    somebody'll somebody's someone'd someone'd've someone'll someone's something'd
    something'd've something'll that's there'd there'd've there're there's they'd
    they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
    what're what's what've when's where'd where's where've who'd who'd've who'll who's
    who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
    y'all'd've you'd you'd've you'll you're you've
""".split()
_CONTRACTIONS = {
    form[:i] + form[i + 1:]: form
    for form in _CONTRACTED_FORMS
    for i, char in enumerate(form)
    if char == "'"
}
# One official entry runs backwards ("somebody'd" -> "somebodyd"); kept for fidelity.
# The official entries "Id've", "I'dve", "Im" and "Ive" are left out: they are
# looked up after lowercasing and so never match ("im" stays "im"). "let's" and
# "she's", which map to themselves, are left out as no-ops.
_CONTRACTIONS["somebody'd"] = "somebodyd"

# Characters of an answer type that cannot be part of a metric name: "yes/no" -> "vqa_accuracy_yes_no".
_NOT_IN_METRIC_NAMES = re.compile(r"[^0-9a-z]+")


def _process_punctuation(text: str) -> str:
    """Official processPunctuation: drop or blank out punctuation, then strip periods.

    A punctuation mark is deleted when some occurrence of it touches a space, or when
    the text contains a digit-comma-digit group (so "1,000" becomes "1000"); otherwise
    it becomes a space (so "t-shirt" becomes "t shirt"). Both tests look at the input
    text, not at the partly processed one, as the official code does.
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out)


def _process_digit_article(text: str) -> str:
    """Official processDigitArticle: lowercase, number words to digits, drop articles, contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """Normalise an answer string the way the official VQA evaluation does.

    Newlines and tabs become spaces, then the official processPunctuation and
    processDigitArticle steps run in that order, so "Yes." -> "yes",
    "Two dogs!" -> "2 dogs", "the t-shirt" -> "t shirt", "dont" -> "don't".

    Unlike the official script, this is applied to every answer, whether or not the
    human answers agree, so that predictions are judged the same way everywhere.
    One deliberate deviation: the official code passes re.UNICODE as the *count* of
    period substitutions, so only the first 32 periods are stripped; here all are,
    which keeps the function idempotent. The result never has leading, trailing or
    repeated spaces, and normalize_answer(normalize_answer(x)) == normalize_answer(x).
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _score_normalized(prediction: str, answers: Sequence[str]) -> float:
    """Leave-one-out VQA score of an already normalised prediction against normalised answers."""
    matches = [answer == prediction for answer in answers]
    total = sum(matches)
    return sum(min(1.0, (total - held_out) / 3) for held_out in matches) / len(matches)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers, in [0, 1].

    For each human answer left out in turn, the prediction scores
    min(1, matching remaining answers / 3); the score is the mean over all of them.
    With ten answers of which k match, this is 0, 0.3, 0.6, 0.9 for k = 0..3 and 1
    for k >= 4. Any number of answers is accepted; none is an error.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of answer strings, not a single string")
    if len(answers) == 0:
        raise ValueError("answers is empty: VQA accuracy needs at least one human answer")
    return _score_normalized(normalize_answer(prediction), [normalize_answer(a) for a in answers])


def _percent(scores: Sequence[float]) -> float:
    """Mean of per-question scores as a percentage rounded to 2 decimals, like the official report."""
    return round(100 * sum(scores) / len(scores), 2)


def answer_type_key(answer_type: str) -> str:
    """The metric name of an answer type: lowercase, every run of other characters than letters and
    digits as one "_" ("yes/no" -> "vqa_accuracy_yes_no", "unanswerable" -> "vqa_accuracy_unanswerable")."""
    slug = _NOT_IN_METRIC_NAMES.sub("_", answer_type.lower()).strip("_")
    if not slug:
        raise ValueError(f"answer type {answer_type!r} has no letter or digit to name its accuracy")
    return f"vqa_accuracy_{slug}"


def vqa_accuracy(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    answer_types: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """Official VQA v2 accuracy over a set of questions, overall and per answer type.

    Returns percentages rounded to 2 decimals under "vqa_accuracy" and, for each
    answer type present, whatever its label (VQA v2: "yes/no", "number", "other";
    VizWiz adds "unanswerable"), under `answer_type_key(type)`: "vqa_accuracy_yes_no",
    "vqa_accuracy_number", ... Questions whose answer type is None count only towards
    the overall accuracy, as in the official script, which groups by the types it finds.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answer lists")
    if answer_types is None:
        answer_types = [None] * len(predictions)
    elif len(answer_types) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions but {len(answer_types)} answer types")
    if len(predictions) == 0:
        raise ValueError("no predictions: VQA accuracy is undefined on an empty set")
    keys: dict[str, str] = {}
    for answer_type in dict.fromkeys(t for t in answer_types if t is not None):
        key = answer_type_key(answer_type)
        clash = next((other for other, other_key in keys.items() if other_key == key), None)
        if clash is not None:
            raise ValueError(f"answer types {clash!r} and {answer_type!r} would both be reported as {key!r}")
        keys[answer_type] = key

    scores = [vqa_score(p, a) for p, a in zip(predictions, answers)]
    result = {"vqa_accuracy": _percent(scores)}
    for answer_type, key in keys.items():
        result[key] = _percent([s for s, t in zip(scores, answer_types) if t == answer_type])
    return result


_CITATION = """\
@inproceedings{goyal2017making,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and Parikh, Devi},
  booktitle={Conference on Computer Vision and Pattern Recognition (CVPR)},
  year={2017}
}
"""

_INPUTS_DESCRIPTION = """\
Args:
    predictions: one predicted answer string per question.
    references: the human answers (usually 10) for each question.
    answer_types: optional keyword argument of compute(), an answer type label
        (VQA v2: "yes/no", "number", "other") or None per question, for per-type accuracies.
Returns:
    "vqa_accuracy" and, per answer type present, "vqa_accuracy_<type>" with every run of
    characters other than letters and digits as "_" ("vqa_accuracy_yes_no"), in percent
    rounded to 2 decimals.
"""


class VqaAccuracy(evaluate.Metric):
    """The official VQA v2 accuracy as an ``evaluate`` metric.

    Answer types are a keyword argument of ``compute`` rather than a feature,
    because every feature is a required input in ``evaluate`` and types are optional.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="VQA v2 accuracy: min(1, humans agreeing / 3), averaged over leave-one-out subsets.",
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://visualqa.org/evaluation.html"],
        )

    def _compute(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
        answer_types: Sequence[str | None] | None = None,
    ) -> dict[str, float]:
        return vqa_accuracy(predictions, references, answer_types)
