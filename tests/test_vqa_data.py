"""Tests for vqa_data: the official-file reader, `datasets` sources, the shapes generator and the
collator. Everything is built in tmp_path; nothing touches the network."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vqa_data  # noqa: E402
from vqa_data import VqaCollator, load_vqa_dataset, load_vqa_files, make_shapes_vqa  # noqa: E402

SUBTYPE = "val2014"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path


def save_image(path: Path, color=(200, 30, 30), size=(8, 8), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)
    return path


def annotation(question_id: int, image_id: int, answers: list[str], consensus: str, answer_type: str = "other") -> dict:
    return {
        "question_id": question_id,
        "image_id": image_id,
        "question_type": "what is",
        "answer_type": answer_type,
        "multiple_choice_answer": consensus,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


def official_docs() -> tuple[dict, dict]:
    """Four questions on three images: 9 (COCO name), 25 (`25.png`) and 30 (COCO name)."""
    questions = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "data_subtype": SUBTYPE,
        "license": {},
        "questions": [
            {"image_id": 9, "question": "What color is the bus?", "question_id": 90},
            {"image_id": 25, "question": "Is it raining?", "question_id": 250},
            {"image_id": 25, "question": "How many dogs?", "question_id": 251},
            {"image_id": 30, "question": "What is this?", "question_id": 300},
        ],
    }
    annotations = {
        "info": {},
        "license": {},
        "data_type": "mscoco",
        "data_subtype": SUBTYPE,
        "annotations": [
            annotation(90, 9, ["red"] * 7 + ["orange"] * 3, "red"),
            annotation(250, 25, ["no"] * 10, "no", "yes/no"),
            annotation(251, 25, ["2", "2", "3"], "2", "number"),
            annotation(300, 30, ["cat"] * 10, "cat"),
        ],
    }
    return questions, annotations


def coco_path(images: Path, image_id: int) -> Path:
    return images / f"COCO_{SUBTYPE}_{image_id:012d}.jpg"


@pytest.fixture
def official(tmp_path):
    """Writes the official-format fixture; returns (questions_file, annotations_file, images_dir)."""
    images = tmp_path / "images"
    save_image(coco_path(images, 9))
    save_image(images / "25.png")
    save_image(coco_path(images, 30))
    questions, annotations = official_docs()
    return (
        write_json(tmp_path / "questions.json", questions),
        write_json(tmp_path / "annotations.json", annotations),
        images,
    )


class RecordingProcessor:
    """Stands in for the real processor: records every call and returns a marker."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return {"call": len(self.calls)}


def row(image, question_id=1, answers=("yes",), consensus="yes", question="Q?") -> dict:
    return {
        "question_id": question_id,
        "image_id": -1,
        "image": image,
        "question": question,
        "answers": list(answers),
        "multiple_choice_answer": consensus,
        "answer_type": None,
    }


# ---------------------------------------------------------------------------------------------
# Official files
# ---------------------------------------------------------------------------------------------


def test_reader_joins_questions_annotations_and_images(official):
    questions_file, annotations_file, images = official
    ds = load_vqa_files(questions_file, annotations_file, images)

    assert ds["question_id"] == [90, 250, 251, 300]
    by_id = {r["question_id"]: r for r in ds}
    bus = by_id[90]
    assert bus["image_id"] == 9
    assert bus["question"] == "What color is the bus?"
    assert bus["answers"] == ["red"] * 7 + ["orange"] * 3
    assert bus["multiple_choice_answer"] == "red"
    assert bus["answer_type"] == "other"
    assert bus["image"]["bytes"] is None
    assert Path(bus["image"]["path"]) == coco_path(images, 9).resolve()
    assert by_id[251]["answers"] == ["2", "2", "3"]
    assert Path(by_id[250]["image"]["path"]) == (images / "25.png").resolve()
    assert Path(by_id[251]["image"]["path"]) == (images / "25.png").resolve()


def test_reader_without_annotations_gives_unlabelled_rows(official):
    questions_file, _, images = official
    ds = load_vqa_files(questions_file, None, images)
    assert len(ds) == 4
    assert all(r["answers"] == [] and r["multiple_choice_answer"] is None for r in ds)


def test_reader_prefers_coco_name_and_falls_back_by_listing(official, tmp_path):
    questions_file, annotations_file, images = official
    save_image(images / "9.webp")  # the COCO name wins over the fallback
    save_image(images / "0030.PNG")  # zero padding and upper-case extensions still match
    coco_path(images, 30).unlink()
    ds = load_vqa_files(questions_file, annotations_file, images)
    paths = {r["question_id"]: Path(r["image"]["path"]).name for r in ds}
    assert paths[90] == coco_path(images, 9).name
    assert paths[300] == "0030.PNG"


def _break_json(q, a):
    return "{\"questions\": [{\"image_id\": 9,"


def _drop_questions_key(q, a):
    del q["questions"]


def _drop_question_field(q, a):
    del q["questions"][2]["question"]


def _drop_consensus_field(q, a):
    del a["annotations"][1]["multiple_choice_answer"]


def _drop_annotation(q, a):
    del a["annotations"][2]


def _add_orphan_annotation(q, a):
    a["annotations"].append(annotation(777, 9, ["x"], "x"))


def _duplicate_question(q, a):
    q["questions"].append(dict(q["questions"][0]))


def _zero_answers(q, a):
    a["annotations"][0]["answers"] = []


def _mismatched_image(q, a):
    a["annotations"][3]["image_id"] = 31


def _question_not_string(q, a):
    q["questions"][3]["question"] = 12


def _answer_not_string(q, a):
    a["annotations"][0]["answers"][4]["answer"] = None


@pytest.mark.parametrize(
    "corrupt, broken_file, expected",
    [
        (_break_json, "questions", ["malformed JSON", "line 1"]),
        (_drop_questions_key, "questions", ["'questions'"]),
        (_drop_question_field, "questions", ["'question'", "question_id=251", "questions[2]"]),
        (_drop_consensus_field, "annotations", ["'multiple_choice_answer'", "question_id=250"]),
        (_drop_annotation, "both", ["251", "no annotation"]),
        (_add_orphan_annotation, "both", ["777", "no question"]),
        (_duplicate_question, "questions", ["duplicate", "90"]),
        (_zero_answers, "annotations", ["question_id=90", "empty"]),
        (_mismatched_image, "both", ["question_id 300", "31", "30"]),
        (_question_not_string, "questions", ["'question'", "str", "question_id=300"]),
        (_answer_not_string, "annotations", ["'answer'", "question_id=90", "answers[4]"]),
    ],
)
def test_reader_rejects_malformed_files_naming_file_and_id(tmp_path, corrupt, broken_file, expected):
    images = tmp_path / "images"
    for image_id in (9, 30):
        save_image(coco_path(images, image_id))
    save_image(images / "25.png")
    questions, annotations = official_docs()
    text = corrupt(questions, annotations)
    questions_file = tmp_path / "q.json"
    annotations_file = tmp_path / "a.json"
    if text is not None:
        questions_file.write_text(text)
    else:
        write_json(questions_file, questions)
    write_json(annotations_file, annotations)

    with pytest.raises(ValueError) as info:
        load_vqa_files(questions_file, annotations_file, images)
    message = str(info.value)
    named = {"questions": [questions_file], "annotations": [annotations_file]}.get(
        broken_file, [questions_file, annotations_file]
    )
    for path in named:
        assert str(path) in message
    for fragment in expected:
        assert fragment in message


def test_reader_accepts_fewer_than_ten_answers(official):
    questions_file, annotations_file, images = official
    ds = load_vqa_files(questions_file, annotations_file, images)
    assert {r["question_id"]: len(r["answers"]) for r in ds}[251] == 3


def test_missing_images_are_reported_before_training(official):
    questions_file, annotations_file, images = official
    (images / "25.png").unlink()
    coco_path(images, 30).unlink()
    with pytest.raises(ValueError) as info:
        load_vqa_files(questions_file, annotations_file, images)
    message = str(info.value)
    assert "2 missing image files" in message
    assert "3 of 4 questions" in message
    assert f"{coco_path(images, 30).resolve()} (question_id=300)" in message
    assert f"(question_id=250)" in message


def test_skip_missing_images_drops_exactly_those_questions(official, caplog):
    questions_file, annotations_file, images = official
    (images / "25.png").unlink()
    with caplog.at_level(logging.WARNING, logger="vqa_data"):
        ds = load_vqa_files(questions_file, annotations_file, images, skip_missing_images=True)
    assert ds["question_id"] == [90, 300]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4 questions" in warnings[0].getMessage()


# ---------------------------------------------------------------------------------------------
# `datasets` sources
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def parquet_source(tmp_path):
    """A parquet file with non-contract column names, relative image paths and dict answers."""
    images = tmp_path / "imgs"
    save_image(images / "a.jpg")
    save_image(images / "b.jpg", color=(0, 0, 255))
    raw = datasets.Dataset.from_dict(
        {
            "qid": [11, 12],
            "file": ["a.jpg", "b.jpg"],
            "text": ["What is it?", "Is it blue?"],
            "answers": [
                [{"answer": "cat", "answer_id": 1}, {"answer": "dog", "answer_id": 2}],
                [{"answer": "yes", "answer_id": 1}],
            ],
            "mc": ["cat", "yes"],
        }
    )
    path = tmp_path / "data.parquet"
    raw.to_parquet(str(path))
    return path, images


MAPPING = {"question_id": "qid", "image": "file", "question": "text", "multiple_choice_answer": "mc"}


def test_load_vqa_dataset_parquet_with_mapping_and_dict_answers(parquet_source, tmp_path):
    path, images = parquet_source
    ds = load_vqa_dataset(
        path, split="validation", column_mapping=MAPPING, images_dir=images, cache_dir=str(tmp_path / "cache")
    )
    assert ds.column_names == list(vqa_data.VQA_COLUMNS)
    first = {r["question_id"]: r for r in ds}[11]
    assert first == {
        "question_id": 11,
        "image_id": -1,
        "image": {"bytes": None, "path": str(images / "a.jpg")},
        "question": "What is it?",
        "answers": ["cat", "dog"],
        "multiple_choice_answer": "cat",
        "answer_type": None,
    }


def test_load_vqa_dataset_missing_column_names_it_and_lists_available(parquet_source, tmp_path):
    path, images = parquet_source
    with pytest.raises(ValueError) as info:
        load_vqa_dataset(
            path,
            split="train",
            column_mapping={**MAPPING, "answer_type": "kind"},
            images_dir=images,
            cache_dir=str(tmp_path / "cache"),
        )
    message = str(info.value)
    assert "'kind'" in message
    for column in ("qid", "file", "text", "answers", "mc"):
        assert column in message


def test_load_vqa_dataset_requires_question_column(parquet_source, tmp_path):
    path, images = parquet_source
    with pytest.raises(ValueError, match="'question'.*available columns"):
        load_vqa_dataset(
            path, split="train", column_mapping={"question_id": "qid", "image": "file"}, cache_dir=str(tmp_path / "c")
        )


def test_load_vqa_dataset_streaming_yields_contract_rows(parquet_source, tmp_path):
    path, images = parquet_source
    ds = load_vqa_dataset(path, split="train", column_mapping=MAPPING, images_dir=images, streaming=True)
    assert isinstance(ds, datasets.IterableDataset)
    rows = list(ds)
    assert [r["question_id"] for r in rows] == [11, 12]
    assert rows[1]["answers"] == ["yes"]
    assert rows[1]["image"] == {"bytes": None, "path": str(images / "b.jpg")}
    assert set(rows[0]) == set(vqa_data.VQA_COLUMNS)


def test_load_vqa_dataset_reports_and_skips_missing_path_images(parquet_source, tmp_path):
    path, images = parquet_source
    (images / "b.jpg").unlink()
    kwargs = dict(split="train", column_mapping=MAPPING, images_dir=images, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"1 missing image files.*b\.jpg \(question_id=12\)"):
        load_vqa_dataset(path, **kwargs)
    assert load_vqa_dataset(path, skip_missing_images=True, **kwargs)["question_id"] == [11]


def test_streaming_source_reports_a_missing_image_no_later_than_the_batch_that_needs_it(parquet_source, tmp_path, caplog):
    path, images = parquet_source
    missing = images / "b.jpg"
    missing.unlink()
    kwargs = dict(split="train", column_mapping=MAPPING, images_dir=images, streaming=True)
    loader = DataLoader(load_vqa_dataset(path, **kwargs), batch_size=1, collate_fn=VqaCollator(RecordingProcessor()))
    batches = iter(loader)
    assert next(batches) == {"call": 1}, "question 11's image is there"
    with pytest.raises(ValueError, match=rf"{re.escape(str(missing))} \(question_id=12\).*skip_missing_images"):
        next(batches)
    with caplog.at_level(logging.WARNING, logger="vqa_data"):
        kept = [row["question_id"] for row in load_vqa_dataset(path, skip_missing_images=True, **kwargs)]
    assert kept == [11]
    assert f"{missing} (question_id=12)" in caplog.text


def test_embedded_image_bytes_stay_undecoded_and_collate(tmp_path):
    """An `Image` feature (like lmms-lab/VQAv2's parquet) is cast to decode=False and the bytes
    travel to the collator, which decodes them."""
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), (0, 255, 0)).save(buffer, format="PNG")
    raw = datasets.Dataset.from_dict(
        {
            "question_id": [1],
            "image": [{"bytes": buffer.getvalue(), "path": "remote/x.png"}],
            "question": ["What color?"],
            "answers": [[{"answer": "green"}]],
            "multiple_choice_answer": ["green"],
        },
        features=datasets.Features(
            {
                "question_id": datasets.Value("int64"),
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "answers": datasets.List({"answer": datasets.Value("string")}),
                "multiple_choice_answer": datasets.Value("string"),
            }
        ),
    )
    path = tmp_path / "embedded.parquet"
    raw.to_parquet(str(path))
    ds = load_vqa_dataset(path, split="test", cache_dir=str(tmp_path / "cache"))
    assert ds.features["image"] == datasets.Image(decode=False)
    assert ds[0]["image"]["bytes"] == buffer.getvalue()
    processor = RecordingProcessor()
    VqaCollator(processor)([ds[0]])
    image = processor.calls[0]["images"][0]
    assert image.size == (5, 3) and image.getpixel((2, 1)) == (0, 255, 0)
    assert processor.calls[0]["answers"] == ["green"]


def test_load_vqa_dataset_from_save_to_disk_folder(tmp_path):
    image = save_image(tmp_path / "i.jpg")
    split = datasets.Dataset.from_dict(
        {"question_id": [5], "image": [str(image)], "question": ["Q?"], "answers": [["a", "b"]]}
    )
    datasets.DatasetDict({"validation": split}).save_to_disk(str(tmp_path / "saved"))
    ds = load_vqa_dataset(tmp_path / "saved", split="validation")
    assert ds[0]["answers"] == ["a", "b"] and ds[0]["image"]["path"] == str(image)
    with pytest.raises(ValueError, match="no split 'train'.*validation"):
        load_vqa_dataset(tmp_path / "saved", split="train")


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, []),
        ("yes", ["yes"]),
        (["a", "b"], ["a", "b"]),
        ([{"answer": "a", "answer_id": 1}, {"answer": "b"}], ["a", "b"]),
        ({"answer": ["a", "a", "c"], "answer_id": [1, 2, 3]}, ["a", "a", "c"]),
    ],
)
def test_flatten_answers_layouts(value, expected):
    assert vqa_data.flatten_answers(value) == expected


# ---------------------------------------------------------------------------------------------
# Synthetic shapes dataset
# ---------------------------------------------------------------------------------------------

# Reference colours, chosen here independently of the generator's palette.
REFERENCE_COLORS = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 220, 0),
    "purple": (128, 0, 160),
    "orange": (255, 128, 0),
}
QUESTION_TYPES = {"is there a", "how many", "what color is the", "what shape is the", "what shape is in the"}
SINGULAR = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}
CORNER_CELLS = {"top left": (0, 0), "top right": (0, 3), "bottom left": (3, 0), "bottom right": (3, 3)}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    paths = make_shapes_vqa(out, num_train_images=600, num_val_images=300, seed=3)
    return paths


def load_split(paths: dict, prefix: str) -> list[dict]:
    """Questions joined with annotations and scenes, straight from the written files."""
    questions = json.loads(Path(paths[f"{prefix}_questions"]).read_text())["questions"]
    annotations = json.loads(Path(paths[f"{prefix}_annotations"]).read_text())["annotations"]
    annotations = {a["question_id"]: a for a in annotations}
    scenes = json.loads(Path(paths[f"{prefix}_scenes"]).read_text())
    return [{**q, **annotations[q["question_id"]], "scene": scenes[str(q["image_id"])]} for q in questions]


def expected_answer(question: str, scene: list[dict]) -> str:
    """The answer according to the documented rules, recomputed from the scene description."""
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if any(o["color"] == m[1] and o["shape"] == m[2] for o in scene) else "no"
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(o["shape"] == SINGULAR[m[1]] for o in scene))
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return str(sum(o["color"] == m[1] for o in scene))
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (match,) = [o for o in scene if o["shape"] == m[1]]
        return match["color"]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        (match,) = [o for o in scene if o["color"] == m[1]]
        return match["shape"]
    if m := re.fullmatch(r"What (shape|color) is (?:in the|the object in the) (\w+ \w+) corner\?", question):
        (match,) = [o for o in scene if (o["row"], o["col"]) == CORNER_CELLS[m[2]]]
        return match[m[1]]
    raise AssertionError(f"unexpected question {question!r}")


def test_shapes_answers_follow_from_the_scene(shapes):
    examples = load_split(shapes, "train") + load_split(shapes, "eval")
    assert len(examples) == 3 * 900
    for example in examples:
        assert example["multiple_choice_answer"] == expected_answer(example["question"], example["scene"])
        assert 3 <= len(example["scene"]) <= 8
        assert len({(o["row"], o["col"]) for o in example["scene"]}) == len(example["scene"])


def test_shapes_constraints(shapes):
    examples = load_split(shapes, "train")
    by_type = defaultdict(Counter)
    for example in examples:
        by_type[example["answer_type"]][example["multiple_choice_answer"]] += 1
    assert set(by_type) == {"yes/no", "number", "other"}
    for answer_type, counts in by_type.items():
        assert abs(sum(counts.values()) / len(examples) - 1 / 3) < 0.02, answer_type
    yes_no = by_type["yes/no"]
    assert set(yes_no) == {"yes", "no"}
    assert abs(yes_no["yes"] / sum(yes_no.values()) - 0.5) <= 0.03
    for answer_type in ("number", "other"):
        counts = by_type[answer_type]
        assert counts.most_common(1)[0][1] / sum(counts.values()) <= 0.20, (answer_type, counts)
    assert set(by_type["number"]) == {str(n) for n in range(6)}
    assert len(by_type["other"]) == 10


# Each question form and how many answers it allows (the counts are 0..5): chance is one over that.
QUESTION_FORMS = {
    r"Is there an? \w+ \w+\?": 2,
    r"How many \w+ are there\?": 6,
    r"How many \w+ objects are there\?": 6,
    r"What color is the \w+\?": len(REFERENCE_COLORS),
    r"What shape is the \w+ object\?": len(SINGULAR),
    r"What shape is in the \w+ \w+ corner\?": len(SINGULAR),
    r"What color is the object in the \w+ \w+ corner\?": len(REFERENCE_COLORS),
}


def question_form(question: str) -> str:
    (form,) = [form for form in QUESTION_FORMS if re.fullmatch(form, question)]
    return form


def test_shapes_answers_are_not_predictable_from_question_text(shapes):
    """The best question-only predictor, the most common training answer of each question text, is at chance
    on val, form by form and overall: within three binomial standard deviations of one over the number of
    answers the form allows. Chance is per form: an "other" question asks for a colour (1 in 6) or a shape
    (1 in 4), so about 20 %, not the 10 % of its ten answers."""
    answers = defaultdict(Counter)
    for example in load_split(shapes, "train"):
        answers[example["question"]][example["multiple_choice_answer"]] += 1
    hits, chances = defaultdict(list), defaultdict(list)
    for example in load_split(shapes, "eval"):
        form = question_form(example["question"])
        guess = answers[example["question"]].most_common(1)[0][0] if example["question"] in answers else None
        hits[form].append(guess == example["multiple_choice_answer"])
        chances[form].append(1 / QUESTION_FORMS[form])
    assert set(hits) == set(QUESTION_FORMS)

    def at_chance(hits: list[bool], chances: list[float]) -> bool:
        spread = sum(chance * (1 - chance) for chance in chances) ** 0.5
        return sum(hits) <= sum(chances) + 3 * spread

    for form in QUESTION_FORMS:
        assert at_chance(hits[form], chances[form]), (form, np.mean(hits[form]), chances[form][0])
    assert at_chance(sum(hits.values(), []), sum(chances.values(), []))


def test_shapes_no_answers_include_near_misses(shapes):
    """Many "no" answers need binding colour to shape: both occur in the image, not together."""
    near, total = 0, 0
    for example in load_split(shapes, "train"):
        if example["answer_type"] == "yes/no" and example["multiple_choice_answer"] == "no":
            color, shape = re.fullmatch(r"Is there an? (\w+) (\w+)\?", example["question"]).groups()
            total += 1
            near += any(o["color"] == color for o in example["scene"]) and any(
                o["shape"] == shape for o in example["scene"]
            )
    assert 0.3 <= near / total <= 0.9


def test_shapes_same_question_gets_different_answers(shapes):
    answers = defaultdict(set)
    for example in load_split(shapes, "train"):
        answers[example["question"]].add(example["multiple_choice_answer"])
    frequent = [q for q, a in answers.items() if q.startswith(("Is there", "How many", "What color is the object"))]
    assert frequent and all(len(answers[q]) > 1 for q in frequent)


def test_shapes_official_format_and_disjoint_splits(shapes):
    train, val = load_split(shapes, "train"), load_split(shapes, "eval")
    for example in train[:30]:
        assert [a["answer_id"] for a in example["answers"]] == list(range(1, 11))
        assert {a["answer_confidence"] for a in example["answers"]} == {"yes"}
        assert {a["answer"] for a in example["answers"]} == {example["multiple_choice_answer"]}
        assert example["question_type"] in QUESTION_TYPES
    assert not {e["image_id"] for e in train} & {e["image_id"] for e in val}
    question_ids = [e["question_id"] for e in train + val]
    assert len(set(question_ids)) == len(question_ids)
    assert json.loads(Path(shapes["eval_questions"]).read_text())["data_subtype"] == "shapes_val"


def test_shapes_files_are_readable_by_the_official_reader(shapes):
    ds = load_vqa_files(shapes["eval_questions"], shapes["eval_annotations"], shapes["eval_images"])
    assert len(ds) == 900
    first = ds[0]
    assert Path(first["image"]["path"]).name == f"COCO_shapes_val_{first['image_id']:012d}.jpg"
    assert len(first["answers"]) == 10


def classify_shape(mask: np.ndarray) -> str:
    """Shape from an object mask, using fill ratio of its bounding box and its bottom row."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    if box.mean() > 0.9:
        return "square"
    if box[-1].mean() > 0.8:
        return "triangle"
    return "circle" if box.mean() > 0.7 else "cross"


def object_boxes(shapes: dict, count: int) -> list[tuple[int, int, int, int]]:
    """Re-derive each cell's content from pixels: empty cells are background, occupied cells hold
    one object of the scene's colour and shape (so objects stay inside their cells). Returns every
    object's bounding box within its cell, (top, left, bottom, right)."""
    scenes = json.loads(Path(shapes["train_scenes"]).read_text())
    images = Path(shapes["train_images"])
    boxes = []
    for image_id in list(scenes)[:count]:
        image = Image.open(images / f"COCO_shapes_train_{int(image_id):012d}.jpg")
        pixels = np.asarray(image.convert("RGB")).astype(int)
        assert pixels.shape == (64, 64, 3)
        objects = {(o["row"], o["col"]): o for o in scenes[image_id]}
        for row in range(4):
            for col in range(4):
                cell = pixels[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16]
                mask = cell.min(axis=2) < 170
                if (row, col) not in objects:
                    assert mask.sum() == 0, (image_id, row, col)
                    continue
                obj = objects[(row, col)]
                assert mask.sum() >= 20
                assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
                median = np.median(cell[mask], axis=0)
                nearest = min(REFERENCE_COLORS, key=lambda name: np.abs(median - REFERENCE_COLORS[name]).sum())
                assert nearest == obj["color"], (image_id, obj, median)
                assert classify_shape(mask) == obj["shape"], (image_id, obj)
                ys, xs = np.nonzero(mask)
                boxes.append((ys.min(), xs.min(), ys.max(), xs.max()))
    return boxes


def test_shapes_images_show_the_scene_objects_fill_their_cells(shapes):
    boxes = object_boxes(shapes, 60)
    assert len(boxes) > 60 * 3
    assert set(boxes) == {(2, 2, 13, 13)}, "without jitter every object is the 12-pixel box 2 pixels into its cell"


def test_shapes_jitter_moves_and_resizes_objects_within_their_cells(tmp_path):
    shapes = make_shapes_vqa(tmp_path, num_train_images=60, num_val_images=3, jitter=True, seed=3)
    boxes = object_boxes(shapes, 60)
    assert len({(top, left) for top, left, _, _ in boxes}) >= 10
    assert len({bottom - top for top, _, bottom, _ in boxes}) >= 3


def test_shapes_deterministic_per_seed(tmp_path):
    def generate(folder, seed):
        paths = make_shapes_vqa(tmp_path / folder, num_train_images=12, num_val_images=4, seed=seed)
        files = sorted(p for p in (tmp_path / folder).rglob("*") if p.is_file())
        return paths, {p.relative_to(tmp_path / folder): p.read_bytes() for p in files}

    _, first = generate("a", seed=1)
    _, again = generate("b", seed=1)
    _, other = generate("c", seed=2)
    assert len(first) == 2 * 3 + 12 + 4  # (questions, annotations, scenes) per split + images
    assert first == again
    assert first.keys() == other.keys()
    changed = [name for name in first if first[name] != other[name]]
    assert any(name.suffix == ".json" for name in changed)
    assert any(name.suffix == ".jpg" for name in changed)


def test_shapes_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="questions_per_image"):
        make_shapes_vqa(tmp_path, num_train_images=2, num_val_images=1, questions_per_image=4)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_vqa(tmp_path, num_train_images=2, num_val_images=1, image_size=66)


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------


def test_collator_passes_decoded_images_unconverted(tmp_path):
    gray = save_image(tmp_path / "gray.png", mode="L", size=(6, 4))
    palette = tmp_path / "pal.gif"
    Image.new("P", (3, 3), 2).save(palette)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    Image.new("RGB", (20, 10), (0, 0, 255)).save(rotated, exif=exif)
    processor = RecordingProcessor()
    collator = VqaCollator(processor, answer_strategy=None)

    result = collator([row(str(gray), 1), row({"bytes": None, "path": str(palette)}, 2), row(Path(rotated), 3)])

    assert result == {"call": 1}
    call = processor.calls[0]
    assert call["text"] == ["Q?", "Q?", "Q?"]
    assert call["answers"] is None
    assert call["return_tensors"] == "pt"
    images = call["images"]
    assert all(isinstance(image, Image.Image) for image in images)
    assert [image.mode for image in images] == ["L", "P", "RGB"]
    assert images[0].getpixel((5, 3)) == 128
    assert images[2].size == (20, 10)  # EXIF orientation is the processor's job


def test_collator_consensus_uses_multiple_choice_answer(tmp_path):
    image = str(save_image(tmp_path / "x.jpg"))
    processor = RecordingProcessor()
    VqaCollator(processor)([row(image, 1, ["a", "b", "b"], "b"), row(image, 2, ["c"], "c")])
    assert processor.calls[0]["answers"] == ["b", "c"]
    with pytest.raises(ValueError, match="question_id 7"):
        VqaCollator(processor)([row(image, 7, ["a"], None)])


def test_collator_sample_draws_proportionally_to_annotators(tmp_path):
    image = str(save_image(tmp_path / "x.jpg"))
    example = row(image, 1, ["yes"] * 7 + ["no"] * 3, "yes")

    def draws(seed: int, n: int) -> list[str]:
        processor = RecordingProcessor()
        collator = VqaCollator(processor, answer_strategy="sample", seed=seed)
        for _ in range(n):
            collator([example])
        return [call["answers"][0] for call in processor.calls]

    first = draws(0, 3000)
    assert 0.67 <= first.count("yes") / len(first) <= 0.73
    assert first[:200] == draws(0, 200)
    assert first[:200] != draws(1, 200)
    with pytest.raises(ValueError, match="question_id 4"):
        VqaCollator(RecordingProcessor(), answer_strategy="sample")([row(image, 4, [], None)])


def test_collator_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="'consensus', 'sample', None"):
        VqaCollator(RecordingProcessor(), answer_strategy="majority")


def _truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


@pytest.mark.parametrize(
    "make_bad_file",
    [_truncated_jpeg, lambda path: path.write_text("not an image"), lambda path: None],
    ids=["truncated-jpeg", "text-file", "missing-file"],
)
def test_collator_names_path_and_question_id_of_unreadable_images(tmp_path, make_bad_file):
    good = str(save_image(tmp_path / "good.jpg"))
    bad = tmp_path / "bad.jpg"
    make_bad_file(bad)
    collator = VqaCollator(RecordingProcessor())
    with pytest.raises(ValueError) as info:
        collator([row(good, 1), row(str(bad), 4242)])
    assert str(bad) in str(info.value) and "question_id=4242" in str(info.value)
    assert info.value.__cause__ is not None


def test_collating_keeps_the_dataset_free_of_pixels(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    questions = {"data_subtype": "big", "questions": []}
    annotations = {"annotations": []}
    for image_id in range(1, 9):
        Image.effect_noise((256, 256), 60).convert("RGB").save(images / f"{image_id}.png")
        questions["questions"].append({"image_id": image_id, "question": "Q?", "question_id": image_id})
        annotations["annotations"].append(annotation(image_id, image_id, ["a"], "a"))
    questions_file = write_json(tmp_path / "q.json", questions)
    ds = load_vqa_files(questions_file, write_json(tmp_path / "a.json", annotations), images)
    processor = RecordingProcessor()
    collator = VqaCollator(processor)
    for start in range(0, len(ds), 4):
        collator([ds[i] for i in range(start, start + 4)])

    assert sum(image.size == (256, 256) for call in processor.calls for image in call["images"]) == 8
    assert ds.features["image"] == datasets.Image(decode=False)
    assert all(value["bytes"] is None and value["path"].endswith(".png") for value in ds["image"])
    assert ds.data.nbytes < 256 * 256 * 3  # less than one decoded image for all 8 rows


def test_shapes_dataset_is_reused_only_when_made_with_the_same_arguments(tmp_path):
    first = make_shapes_vqa(tmp_path, num_train_images=6, num_val_images=3, seed=1)
    annotations = Path(first["train_annotations"])
    stamp = annotations.stat().st_mtime_ns
    assert make_shapes_vqa(tmp_path, num_train_images=6, num_val_images=3, seed=1) == first
    assert annotations.stat().st_mtime_ns == stamp, "an identical dataset is not written again"
    make_shapes_vqa(tmp_path, num_train_images=9, num_val_images=3, seed=1)
    assert len(json.loads(annotations.read_text())["annotations"]) == 9 * 3
    image = Path(first["train_images"]) / "COCO_shapes_train_000000000001.jpg"
    plain = image.read_bytes()
    make_shapes_vqa(tmp_path, num_train_images=9, num_val_images=3, jitter=True, seed=1)
    assert image.read_bytes() != plain, "a jittered dataset is not taken for a plain one"


def test_shapes_dataset_from_another_generator_version_is_made_again(tmp_path, monkeypatch):
    first = make_shapes_vqa(tmp_path, num_train_images=6, num_val_images=3, seed=1)
    annotations = Path(first["train_annotations"])
    stamp = annotations.stat().st_mtime_ns
    monkeypatch.setattr(vqa_data, "_SHAPES_VERSION", vqa_data._SHAPES_VERSION + 1)
    make_shapes_vqa(tmp_path, num_train_images=6, num_val_images=3, seed=1)
    assert annotations.stat().st_mtime_ns != stamp
    assert json.loads(annotations.read_text())["info"]["version"] == vqa_data._SHAPES_VERSION
