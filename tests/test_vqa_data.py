"""Tests for vqa_data: the official-file reader and `datasets` sources. Everything is built in tmp_path;
nothing touches the network."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import datasets
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from conftest import RecordingProcessor, save_image, write_json

import vqa_data
from vqa_collator import VqaCollator
from vqa_data import load_vqa_dataset, load_vqa_files

SUBTYPE = "val2014"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


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


def test_test_dev_questions_find_their_images_among_the_test2015_ones(official, tmp_path):
    questions_file, _, _ = official
    questions = json.loads(questions_file.read_text())
    questions["data_subtype"] = "test-dev2015"
    test_dev = write_json(tmp_path / "test-dev.json", questions)
    images = tmp_path / "test2015"
    for image_id in (9, 25):
        save_image(images / f"COCO_test2015_{image_id:012d}.jpg")
    with pytest.raises(ValueError, match=r"COCO_test2015_000000000030\.jpg \(question_id=300\)"):
        load_vqa_files(test_dev, None, images)
    save_image(images / "COCO_test2015_000000000030.jpg")
    ds = load_vqa_files(test_dev, None, images)
    assert [Path(row["image"]["path"]).name for row in ds] == [
        f"COCO_test2015_{image_id:012d}.jpg" for image_id in (9, 25, 25, 30)
    ]


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


@pytest.mark.parametrize("streaming", [False, True])
def test_a_source_with_only_image_question_and_answer_gets_the_rest_derived(tmp_path, streaming):
    image = save_image(tmp_path / "i.jpg")
    raw = datasets.Dataset.from_dict({"image": [str(image)] * 3, "question": ["Q1?", "Q2?", "Q3?"],
                                      "answer": ["red", "two", None], "extra": [1, 2, 3]})
    raw.to_parquet(str(tmp_path / "data.parquet"))
    rows = list(load_vqa_dataset(tmp_path / "data.parquet", split="test", streaming=streaming,
                                 column_mapping={"multiple_choice_answer": "answer"}, cache_dir=str(tmp_path / "c")))
    assert [row["question_id"] for row in rows] == [0, 1, 2], "a question's id is its position in the split"
    assert rows[0]["answers"] == ["red"] * 10, "one answer stands for the ten annotators"
    assert rows[2]["answers"] == [] and rows[2]["multiple_choice_answer"] is None
    assert {row["image_id"] for row in rows} == {-1} and {row["answer_type"] for row in rows} == {None}


def test_the_consensus_of_a_source_without_one_is_its_most_common_answer(tmp_path):
    image = save_image(tmp_path / "i.jpg")
    raw = datasets.Dataset.from_dict({"question_id": [7], "image": [str(image)], "question": ["Q?"],
                                      "answers": [["no", "yes", "yes", "no", "yes"]]})
    (row,) = vqa_data.to_vqa_rows(raw)
    assert row["multiple_choice_answer"] == "yes" and row["answers"] == ["no", "yes", "yes", "no", "yes"]
    assert row["question_id"] == 7


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
