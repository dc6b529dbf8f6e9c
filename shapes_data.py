"""The offline synthetic VQA dataset of coloured shapes, written in the official VQA v2 layout.

It is what the demo trains on (`configs/demo.yaml`, `--synthetic_data_dir`): small enough to train a tiny
model on a CPU in minutes, but every answer has to be read from the image. `make_shapes_vqa` writes the
question and annotation files and a COCO-named image folder per split, which `vqa_data.load_vqa_files`
reads like the real ones.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

GRID = 4
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 190),
    "orange": (245, 135, 25),
}
MAX_COUNT = 5
_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Corner cells of the grid used by position questions: (name, row, column).
_CORNERS = (
    ("top left corner", 0, 0),
    ("top right corner", 0, GRID - 1),
    ("bottom left corner", GRID - 1, 0),
    ("bottom right corner", GRID - 1, GRID - 1),
)
_ANSWER_TYPES = ("yes/no", "number", "other")
_MIN_OBJECTS, _MAX_OBJECTS = 3, 8
_TEN_ANSWERS = range(1, 11)
# Recorded in the files and compared before a dataset is reused: bump it whenever the generator's output changes
# for the same arguments (2: centred objects and corner questions), so old data is never taken for new.
_SHAPES_VERSION = 2


class _Object(NamedTuple):
    shape: str
    color: str
    row: int
    col: int


class _CountPlan(NamedTuple):
    """The planned number question of an image: how many objects have `attribute == value`."""

    attribute: str  # "shape" or "color"
    value: str
    count: int


class _QA(NamedTuple):
    question: str
    answer: str
    question_type: str


class _Deck:
    """Deals values in shuffled rounds, so every value is dealt equally often (within one round)."""

    def __init__(self, values: Sequence[Any], rng: random.Random) -> None:
        self._values, self._rng, self._pending = list(values), rng, []

    def draw(self) -> Any:
        if not self._pending:
            self._pending = list(self._values)
            self._rng.shuffle(self._pending)
        return self._pending.pop()


class _Balancer:
    """Per-split sampling state that keeps every answer type's answers balanced by construction."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.yes_no = _Deck(["yes", "no"], rng)
        self.counts = _Deck(range(MAX_COUNT + 1), rng)
        self.other_usage: Counter[str] = Counter()


def make_shapes_vqa(
    out_dir: str | os.PathLike,
    *,
    num_train_images: int = 4000,
    num_val_images: int = 300,
    questions_per_image: int = 3,
    image_size: int = 64,
    jitter: bool = False,
    seed: int = 0,
) -> dict[str, str]:
    """Write a synthetic VQA dataset of coloured shapes in the official VQA v2 format.

    It is the offline demo's dataset: small enough to train on a CPU in minutes, but every answer
    has to be read from the image. The files are byte-identical for identical arguments.

    Scenes: a `GRID` x `GRID` grid of cells of `image_size / 4` pixels, so a ViT with patch size
    `image_size / 4` sees exactly one cell per patch. An image holds 3 to 8 objects, each in its
    own cell, of one of `SHAPES` and one of the six `COLORS`, on a light grey background with a
    slight random tint. An object fills its cell but for a 2-pixel margin (at 64 px); with
    `jitter`, its size and position within the cell vary at random (it never leaves the cell),
    which the tiny demo model learns several times more slowly: a patch embedding is linear, so
    a shape that moves within its patch has to be learned at every offset. JPEG quality 95
    without chroma subsampling keeps the colours separable.

    Spatial rule: row 0 is the top row of cells, row 3 the bottom row, column 0 the leftmost and
    column 3 the rightmost. "In the top left corner" means "in the cell at row 0, column 0"
    (likewise the other three corners); it is a property of the cell, not of pixel coordinates.
    A position question is only asked about an occupied corner.

    Questions, one per answer type per image in rotation (question `k` of image `i` has type
    `(i * questions_per_image + k) % 3`, so each type holds a third of the questions):
    - yes/no: "Is there a <color> <shape>?". "yes" and "no" alternate in shuffled pairs. A
      "yes" asks about a random object; a "no" asks about an absent combination, half the time
      (when possible) a near miss whose colour and shape both occur, but on different objects.
    - number: "How many <shape>s are there?" or "How many <color> objects are there?". The
      count 0..5 comes from a shuffled deck and the shape/colour is drawn independently, then
      the scene is built to match, so the count does not depend on the question text.
    - other: "What color is the <shape>?" (exactly one such shape), "What shape is the <color>
      object?" (exactly one object of that colour), "What shape is in the <corner>?" and "What
      color is the object in the <corner>?" (that corner holds an object). Among the questions an
      image allows, the answer used least so far is chosen, balancing the ten answers.

    Besides the official files, `<subtype>_scenes.json` records every scene
    (`{image_id: [{"shape", "color", "row", "col"}, ...]}`) for tests and inspection.

    Returns the paths: `{train,eval}_{questions,annotations,images,scenes}` (train is subtype
    `shapes_train`, eval is `shapes_val`; their image ids do not overlap).
    """
    if not 1 <= questions_per_image <= len(_ANSWER_TYPES):
        raise ValueError(
            f"questions_per_image must be 1..{len(_ANSWER_TYPES)} (one per answer type), got {questions_per_image}"
        )
    if image_size % GRID or image_size < 8 * GRID:
        raise ValueError(f"image_size must be a multiple of {GRID} and at least {8 * GRID}, got {image_size}")
    if num_train_images < 1 or num_val_images < 1:
        raise ValueError("num_train_images and num_val_images must be positive")
    out_dir = Path(out_dir)
    splits = (
        ("train", "shapes_train", range(1, num_train_images + 1)),
        ("eval", "shapes_val", range(num_train_images + 1, num_train_images + num_val_images + 1)),
    )
    info = {
        "description": "synthetic shapes VQA",
        "version": _SHAPES_VERSION,
        "arguments": dict(
            num_train_images=num_train_images, num_val_images=num_val_images,
            questions_per_image=questions_per_image, image_size=image_size, jitter=jitter, seed=seed,
        ),
    }
    paths = {
        f"{prefix}_{key}": str(path) for prefix, subtype, _ in splits for key, path in _split_paths(out_dir, subtype).items()
    }
    if _made_with(paths, info):
        logger.info("reusing the shapes dataset in %s (made with the same arguments)", out_dir)
        return paths
    for _, subtype, image_ids in splits:
        _write_shapes_split(out_dir, subtype, image_ids, questions_per_image, image_size, jitter, seed, info)
    return paths


def _split_paths(out_dir: Path, subtype: str) -> dict[str, Path]:
    return {
        "questions": out_dir / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
        "annotations": out_dir / f"v2_mscoco_{subtype}_annotations.json",
        "scenes": out_dir / f"{subtype}_scenes.json",
        "images": out_dir / subtype,
    }


def _made_with(paths: dict[str, str], info: dict) -> bool:
    """Whether a complete shapes dataset made with the same arguments is already there (the annotation
    files are written last, after every image of their split)."""
    try:
        return all(
            json.loads(Path(paths[f"{prefix}_annotations"]).read_text())["info"] == info for prefix in ("train", "eval")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_shapes_split(
    out_dir: Path,
    subtype: str,
    image_ids: range,
    questions_per_image: int,
    image_size: int,
    jitter: bool,
    seed: int,
    info: dict,
) -> None:
    rng = random.Random(f"shapes-vqa:{seed}:{subtype}")
    balancer = _Balancer(rng)
    files = _split_paths(out_dir, subtype)
    images_dir = files["images"]
    images_dir.mkdir(parents=True, exist_ok=True)
    questions, annotations, scenes = [], [], {}
    for index, image_id in enumerate(image_ids):
        first = index * questions_per_image
        types = [_ANSWER_TYPES[(first + k) % len(_ANSWER_TYPES)] for k in range(questions_per_image)]
        scene, qas = _make_example(types, balancer)
        scenes[str(image_id)] = [obj._asdict() for obj in scene]
        _render(scene, image_size, jitter, rng).save(
            images_dir / f"COCO_{subtype}_{image_id:012d}.jpg", quality=95, subsampling=0
        )
        for k, (answer_type, qa) in enumerate(zip(types, qas)):
            question_id = image_id * 10 + k
            questions.append({"image_id": image_id, "question": qa.question, "question_id": question_id})
            annotations.append(_annotation(question_id, image_id, answer_type, qa))
    header = {
        "info": info,
        "license": {"name": "CC0"},
        "data_type": "shapes",
        "data_subtype": subtype,
    }
    _write_json(files["questions"], {**header, "task_type": "Open-Ended", "questions": questions})
    _write_json(files["scenes"], scenes)
    _write_json(files["annotations"], {**header, "annotations": annotations})


def _write_json(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document, separators=(",", ":")), encoding="utf-8")


def _annotation(question_id: int, image_id: int, answer_type: str, qa: _QA) -> dict[str, Any]:
    return {
        "question_type": qa.question_type,
        "multiple_choice_answer": qa.answer,
        "answers": [{"answer": qa.answer, "answer_confidence": "yes", "answer_id": k} for k in _TEN_ANSWERS],
        "image_id": image_id,
        "answer_type": answer_type,
        "question_id": question_id,
    }


def _make_example(types: list[str], balancer: _Balancer) -> tuple[list[_Object], list[_QA]]:
    """A scene and one question per entry of `types`, answers balanced through `balancer`."""
    rng = balancer.rng
    plan = None
    if "number" in types:
        attribute = rng.choice(("shape", "color"))
        value = rng.choice(SHAPES if attribute == "shape" else tuple(COLORS))
        plan = _CountPlan(attribute, value, balancer.counts.draw())
    scene = _make_scene(plan, rng)
    while "other" in types and not _other_candidates(scene):
        scene = _make_scene(plan, rng)
    builders = {
        "yes/no": lambda: _yes_no_question(scene, balancer),
        "number": lambda: _count_question(plan),
        "other": lambda: _other_question(scene, balancer),
    }
    return scene, [builders[answer_type]() for answer_type in types]


def _make_scene(plan: _CountPlan | None, rng: random.Random) -> list[_Object]:
    """3..8 objects in distinct cells; with a plan, exactly `plan.count` have the planned attribute."""
    low = max(_MIN_OBJECTS, plan.count if plan else 0)
    cells = sorted(rng.sample(range(GRID * GRID), rng.randint(low, _MAX_OBJECTS)))
    planned = set(rng.sample(cells, plan.count)) if plan else set()
    scene = []
    for cell in cells:
        attributes = {"shape": rng.choice(SHAPES), "color": rng.choice(tuple(COLORS))}
        if plan:
            choices = SHAPES if plan.attribute == "shape" else tuple(COLORS)
            attributes[plan.attribute] = (
                plan.value if cell in planned else rng.choice([value for value in choices if value != plan.value])
            )
        scene.append(_Object(attributes["shape"], attributes["color"], cell // GRID, cell % GRID))
    return scene


def _yes_no_question(scene: list[_Object], balancer: _Balancer) -> _QA:
    rng = balancer.rng
    answer = balancer.yes_no.draw()
    present = {(obj.color, obj.shape) for obj in scene}
    if answer == "yes":
        color, shape = _random_combo_of(scene, rng)
    else:
        absent = [(color, shape) for color in COLORS for shape in SHAPES if (color, shape) not in present]
        colors, shapes = {obj.color for obj in scene}, {obj.shape for obj in scene}
        near_misses = [(color, shape) for color, shape in absent if color in colors and shape in shapes]
        pool = near_misses if near_misses and rng.random() < 0.5 else absent
        color, shape = pool[rng.randrange(len(pool))]
    article = "an" if color[0] in "aeiou" else "a"
    return _QA(f"Is there {article} {color} {shape}?", answer, "is there a")


def _random_combo_of(scene: list[_Object], rng: random.Random) -> tuple[str, str]:
    obj = scene[rng.randrange(len(scene))]
    return obj.color, obj.shape


def _count_question(plan: _CountPlan) -> _QA:
    if plan.attribute == "shape":
        question = f"How many {_PLURALS[plan.value]} are there?"
    else:
        question = f"How many {plan.value} objects are there?"
    return _QA(question, str(plan.count), "how many")


def _other_candidates(scene: list[_Object]) -> list[_QA]:
    """Every unambiguous "other" question about the scene (see `make_shapes_vqa` for the rules)."""
    candidates = []
    by_shape, by_color = defaultdict(list), defaultdict(list)
    for obj in scene:
        by_shape[obj.shape].append(obj)
        by_color[obj.color].append(obj)
    for shape, objects in by_shape.items():
        if len(objects) == 1:
            candidates.append(_QA(f"What color is the {shape}?", objects[0].color, "what color is the"))
    for color, objects in by_color.items():
        if len(objects) == 1:
            candidates.append(_QA(f"What shape is the {color} object?", objects[0].shape, "what shape is the"))
    for name, row, col in _CORNERS:
        for obj in scene:
            if (obj.row, obj.col) == (row, col):
                candidates.append(_QA(f"What shape is in the {name}?", obj.shape, "what shape is in the"))
                candidates.append(_QA(f"What color is the object in the {name}?", obj.color, "what color is the"))
    return candidates


def _other_question(scene: list[_Object], balancer: _Balancer) -> _QA:
    """The least used answer so far among those the scene allows (random tie break), then a
    random question with that answer."""
    candidates = _other_candidates(scene)
    answers = sorted({qa.answer for qa in candidates})
    fewest = min(balancer.other_usage[answer] for answer in answers)
    answer = balancer.rng.choice([a for a in answers if balancer.other_usage[a] == fewest])
    balancer.other_usage[answer] += 1
    return balancer.rng.choice([qa for qa in candidates if qa.answer == answer])


def _render(scene: list[_Object], image_size: int, jitter: bool, rng: random.Random) -> Image.Image:
    cell = image_size // GRID
    background = tuple(240 + rng.randint(-8, 8) for _ in range(3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    margin = cell // 8
    for obj in scene:
        if jitter:
            size = rng.randint(max(3, round(0.6 * cell)), cell - 2)
            left, top = rng.randint(1, cell - 1 - size), rng.randint(1, cell - 1 - size)
        else:
            size, left, top = cell - 2 * margin, margin, margin
        _draw_shape(draw, obj.shape, obj.col * cell + left, obj.row * cell + top, size, COLORS[obj.color])
    return image


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, left: int, top: int, size: int, color: tuple[int, int, int]
) -> None:
    """Draw `shape` filling the square box of side `size` at (`left`, `top`)."""
    right, bottom = left + size - 1, top + size - 1
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=color)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=color)
    elif shape == "triangle":
        draw.polygon(((left + (size - 1) / 2, top), (right, bottom), (left, bottom)), fill=color)
    elif shape == "cross":
        third = size / 3
        draw.rectangle((left, round(top + third), right, round(bottom - third)), fill=color)
        draw.rectangle((round(left + third), top, round(right - third), bottom), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")
