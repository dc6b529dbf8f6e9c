"""Tests for shapes_data: the synthetic shapes dataset follows its documented rules, in the official layout."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import shapes_data
from shapes_data import make_shapes_vqa
from vqa_data import load_vqa_files


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
    monkeypatch.setattr(shapes_data, "_SHAPES_VERSION", shapes_data._SHAPES_VERSION + 1)
    make_shapes_vqa(tmp_path, num_train_images=6, num_val_images=3, seed=1)
    assert annotations.stat().st_mtime_ns != stamp
    assert json.loads(annotations.read_text())["info"]["version"] == shapes_data._SHAPES_VERSION
