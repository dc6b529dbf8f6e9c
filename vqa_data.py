"""Where VQA examples come from, and the collator that turns them into model inputs.

Every source in this module yields rows with the same contract, which the training script
relies on:

    {
        "question_id": int,
        "image_id": int,                      # -1 when the source does not know it
        "image": {"bytes": bytes | None, "path": str | None},   # datasets.Image(decode=False)
        "question": str,
        "answers": list[str],                 # the human answers (10 in VQA v2, [] if unlabelled)
        "multiple_choice_answer": str | None, # the consensus answer
        "answer_type": str | None,            # "yes/no", "number" or "other"
    }

Images are never decoded or stored as pixels in a dataset: the image column holds a path (or the
undecoded bytes of sources that embed their images), and only the collator opens an image, one
batch at a time. So memory does not grow with the number of examples, only with the metadata.

Sources:
- `load_vqa_files`: the official VQA v2 question/annotation JSON files plus a COCO image folder.
- `load_vqa_dataset`: any `datasets` source (hub id, local parquet/json/csv/arrow files, a
  `save_to_disk` folder), renamed into the contract by a column mapping; optionally streaming.
- `make_shapes_vqa`: an offline synthetic dataset of coloured shapes in the official format.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

VQA_COLUMNS = (
    "question_id",
    "image_id",
    "image",
    "question",
    "answers",
    "multiple_choice_answer",
    "answer_type",
)
VQA_FEATURES = datasets.Features(
    {
        "question_id": datasets.Value("int64"),
        "image_id": datasets.Value("int64"),
        "image": datasets.Image(decode=False),
        "question": datasets.Value("string"),
        "answers": datasets.List(datasets.Value("string")),
        "multiple_choice_answer": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
    }
)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff")
ANSWER_STRATEGIES = ("consensus", "sample", None)

# Contract columns a source must provide; the others get a default when the source lacks them.
_REQUIRED_COLUMNS = ("question_id", "image", "question")
_COLUMN_DEFAULTS: dict[str, Any] = {
    "image_id": -1,
    "answers": [],
    "multiple_choice_answer": None,
    "answer_type": None,
}
_BUILDER_BY_SUFFIX = {
    ".parquet": "parquet",
    ".json": "json",
    ".jsonl": "json",
    ".arrow": "arrow",
    ".csv": "csv",
}
_MAX_REPORTED = 5


class VqaDataError(ValueError):
    """Invalid VQA data: malformed files, inconsistent ids, missing columns or images."""


class VqaImageError(VqaDataError):
    """An image that cannot be read or decoded; the message names the file and the question id."""


# ---------------------------------------------------------------------------------------------
# Official VQA v2 files
# ---------------------------------------------------------------------------------------------


class _Question(NamedTuple):
    question_id: int
    image_id: int
    question: str


class _Annotation(NamedTuple):
    question_id: int
    image_id: int
    answers: list[str]
    multiple_choice_answer: str
    answer_type: str | None


def load_vqa_files(
    questions_file: str | os.PathLike,
    annotations_file: str | os.PathLike | None,
    images_dir: str | os.PathLike,
    *,
    skip_missing_images: bool = False,
) -> datasets.Dataset:
    """Read the official VQA v2 question and annotation files into a contract `Dataset`.

    Questions and annotations are joined on `question_id` and validated strictly (every problem
    is a `VqaDataError` naming the file and the question id or entry index), because a silently
    dropped or mismatched annotation corrupts training and evaluation without any visible error.
    `annotations_file=None` (test splits) gives rows with `answers == []`.

    Images are looked up as `<images_dir>/COCO_<data_subtype>_<12-digit image_id>.jpg` (the COCO
    naming, `data_subtype` from the questions file), then as `<images_dir>/<image_id>.<ext>` for
    any of `IMAGE_EXTENSIONS`. Missing images are found here, before any training starts: they
    raise an error listing the first few, or with `skip_missing_images=True` their questions are
    dropped with a warning.
    """
    questions_doc = _read_json(questions_file, "questions")
    questions = _parse_questions(questions_doc["questions"], questions_file)
    annotations = None
    if annotations_file is not None:
        annotations_doc = _read_json(annotations_file, "annotations")
        annotations = _parse_annotations(annotations_doc["annotations"], annotations_file)
        _check_join(questions, annotations, questions_file, annotations_file)

    subtype = questions_doc.get("data_subtype")
    image_paths = _locate_images(
        {q.image_id for q in questions}, images_dir, subtype if isinstance(subtype, str) else None
    )
    missing = [(q.question_id, image_paths[q.image_id][0]) for q in questions if not image_paths[q.image_id][1]]
    if missing:
        _report_missing_images(missing, len(questions), str(questions_file), skip_missing_images)
        dropped = {question_id for question_id, _ in missing}
        questions = [q for q in questions if q.question_id not in dropped]
    return _rows_to_dataset(questions, annotations, {i: p for i, (p, _) in image_paths.items()})


def _read_json(path: str | os.PathLike, key: str) -> dict:
    """Parse a JSON file whose top level is an object holding a list under `key`."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except json.JSONDecodeError as exc:
        raise VqaDataError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno} (char {exc.pos}): {exc.msg}"
        ) from exc
    if not isinstance(document, dict):
        raise VqaDataError(f"{path}: expected a JSON object at the top level, got {type(document).__name__}")
    if key not in document:
        raise VqaDataError(f"{path}: missing top-level key {key!r} (found keys: {sorted(document)})")
    if not isinstance(document[key], list):
        raise VqaDataError(f"{path}: top-level {key!r} must be a list, got {type(document[key]).__name__}")
    return document


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _field(entry: dict, name: str, types: type | tuple[type, ...], where: str, *, required: bool = True) -> Any:
    """Return `entry[name]`, checking presence and type (bools do not count as ints)."""
    if name not in entry:
        if required:
            raise VqaDataError(f"{where}: missing field {name!r}")
        return None
    value = entry[name]
    expected = _as_tuple(types)
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        names = " or ".join(t.__name__ for t in expected)
        raise VqaDataError(f"{where}: field {name!r} must be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _entries(items: list, path: str | os.PathLike, key: str) -> Iterable[tuple[int, str, dict]]:
    """Yield `(question_id, location, entry)`; the location names the file, index and question id."""
    for index, entry in enumerate(items):
        where = f"{path}: {key}[{index}]"
        if not isinstance(entry, dict):
            raise VqaDataError(f"{where}: expected an object, got {type(entry).__name__}")
        question_id = _field(entry, "question_id", int, where)
        yield question_id, f"{where} (question_id={question_id})", entry


def _parse_questions(items: list, path: str | os.PathLike) -> list[_Question]:
    questions: list[_Question] = []
    seen: dict[int, int] = {}
    for index, (question_id, where, entry) in enumerate(_entries(items, path, "questions")):
        _check_unique(question_id, index, seen, path, "questions")
        questions.append(
            _Question(question_id, _field(entry, "image_id", int, where), _field(entry, "question", str, where))
        )
    return questions


def _parse_annotations(items: list, path: str | os.PathLike) -> dict[int, _Annotation]:
    annotations: dict[int, _Annotation] = {}
    seen: dict[int, int] = {}
    for index, (question_id, where, entry) in enumerate(_entries(items, path, "annotations")):
        _check_unique(question_id, index, seen, path, "annotations")
        annotations[question_id] = _Annotation(
            question_id=question_id,
            image_id=_field(entry, "image_id", int, where),
            answers=_parse_answer_list(_field(entry, "answers", list, where), where),
            multiple_choice_answer=_field(entry, "multiple_choice_answer", str, where),
            answer_type=_field(entry, "answer_type", str, where, required=False),
        )
    return annotations


def _check_unique(question_id: int, index: int, seen: dict[int, int], path: str | os.PathLike, key: str) -> None:
    if question_id in seen:
        raise VqaDataError(
            f"{path}: duplicate question_id {question_id} ({key}[{seen[question_id]}] and {key}[{index}])"
        )
    seen[question_id] = index


def _parse_answer_list(answers: list, where: str) -> list[str]:
    if not answers:
        raise VqaDataError(f"{where}: 'answers' is empty; every annotation needs at least one human answer")
    parsed = []
    for index, answer in enumerate(answers):
        answer_where = f"{where}: answers[{index}]"
        if not isinstance(answer, dict):
            raise VqaDataError(f"{answer_where}: expected an object, got {type(answer).__name__}")
        parsed.append(_field(answer, "answer", str, answer_where))
    return parsed


def _check_join(
    questions: list[_Question],
    annotations: dict[int, _Annotation],
    questions_file: str | os.PathLike,
    annotations_file: str | os.PathLike,
) -> None:
    """Every question has exactly one annotation for the same image, and vice versa."""
    question_ids = {q.question_id for q in questions}
    unannotated = [q.question_id for q in questions if q.question_id not in annotations]
    if unannotated:
        raise VqaDataError(
            f"question_id {unannotated[0]} in {questions_file} has no annotation in {annotations_file} "
            f"({len(unannotated)} questions without annotation; first ids: {unannotated[:_MAX_REPORTED]})"
        )
    orphans = [question_id for question_id in annotations if question_id not in question_ids]
    if orphans:
        raise VqaDataError(
            f"annotation for question_id {orphans[0]} in {annotations_file} has no question in {questions_file} "
            f"({len(orphans)} annotations without question; first ids: {orphans[:_MAX_REPORTED]})"
        )
    for question in questions:
        annotation = annotations[question.question_id]
        if annotation.image_id != question.image_id:
            raise VqaDataError(
                f"{annotations_file}: annotation for question_id {question.question_id} has image_id "
                f"{annotation.image_id}, but the question in {questions_file} has image_id {question.image_id}"
            )


def _locate_images(
    image_ids: set[int], images_dir: str | os.PathLike, data_subtype: str | None
) -> dict[int, tuple[str, bool]]:
    """Map each image id to `(path, exists)`, listing `images_dir` once instead of stat-ing files.

    A missing image is reported under its COCO name when the subtype is known (that is the name
    users are expected to provide), else under `<image_id>.jpg`.
    """
    if not os.path.isdir(images_dir):
        raise VqaDataError(f"images directory {images_dir} does not exist or is not a directory")
    root = os.path.abspath(images_dir)
    names = set(os.listdir(root))
    by_id = _images_by_numeric_stem(names)
    located = {}
    for image_id in image_ids:
        coco_name = f"COCO_{data_subtype}_{image_id:012d}.jpg" if data_subtype else None
        if coco_name and coco_name in names:
            located[image_id] = (os.path.join(root, coco_name), True)
        elif image_id in by_id:
            located[image_id] = (os.path.join(root, by_id[image_id]), True)
        else:
            located[image_id] = (os.path.join(root, coco_name or f"{image_id}.jpg"), False)
    return located


def _images_by_numeric_stem(names: Iterable[str]) -> dict[int, str]:
    """`{image_id: file name}` for files named `<digits>.<image extension>`, preferring earlier extensions."""
    rank = {extension: position for position, extension in enumerate(IMAGE_EXTENSIONS)}
    best: dict[int, tuple[int, str]] = {}
    for name in names:
        stem, _, extension = name.rpartition(".")
        extension = extension.lower()
        if not stem.isdigit() or extension not in rank:
            continue
        image_id = int(stem)
        if image_id not in best or rank[extension] < best[image_id][0]:
            best[image_id] = (rank[extension], name)
    return {image_id: name for image_id, (_, name) in best.items()}


def _report_missing_images(missing: list[tuple[int, str]], total: int, source: str, skip: bool) -> None:
    """Raise (default) or warn about questions whose image file does not exist."""
    unique_paths = {path for _, path in missing}
    examples = ", ".join(f"{path} (question_id={question_id})" for question_id, path in missing[:_MAX_REPORTED])
    summary = (
        f"{len(unique_paths)} missing image files in {source}, used by {len(missing)} of {total} questions; "
        f"first: {examples}"
    )
    if not skip:
        raise VqaDataError(f"{summary}. Pass skip_missing_images=True to drop these questions.")
    logger.warning("Dropping questions with missing images: %s", summary)


def _rows_to_dataset(
    questions: list[_Question], annotations: dict[int, _Annotation] | None, image_paths: dict[int, str]
) -> datasets.Dataset:
    columns: dict[str, list] = {name: [] for name in VQA_COLUMNS}
    for question in questions:
        annotation = annotations[question.question_id] if annotations is not None else None
        columns["question_id"].append(question.question_id)
        columns["image_id"].append(question.image_id)
        columns["image"].append(image_paths[question.image_id])
        columns["question"].append(question.question)
        columns["answers"].append(annotation.answers if annotation else [])
        columns["multiple_choice_answer"].append(annotation.multiple_choice_answer if annotation else None)
        columns["answer_type"].append(annotation.answer_type if annotation else None)
    return datasets.Dataset.from_dict(columns, features=VQA_FEATURES)


# ---------------------------------------------------------------------------------------------
# Any `datasets` source
# ---------------------------------------------------------------------------------------------


def load_vqa_dataset(
    name_or_path: str | os.PathLike,
    *,
    split: str,
    column_mapping: Mapping[str, str] | None = None,
    streaming: bool = False,
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
    images_dir: str | os.PathLike | None = None,
    skip_missing_images: bool = False,
    **load_kwargs: Any,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of any `datasets` source and rename it into the row contract.

    `name_or_path` is a hub id, a builder name used with `data_files` (`"parquet"`, `"json"`,
    ...), a local data file (`.parquet`, `.json`, `.jsonl`, `.arrow`, `.csv`), a folder of data
    files, or a `save_to_disk` folder. `column_mapping` maps contract names to source columns
    (see `to_vqa_rows`); relative image paths are resolved against `images_dir`. `streaming=True`
    returns an `IterableDataset` (nothing is downloaded or converted up front). Missing image files
    are reported (or, with `skip_missing_images`, dropped) as in `load_vqa_files`: for non-streaming
    sources here, all at once; for streaming sources as the rows stream by, so no later than the
    first batch that needs the image.
    Extra keyword arguments go to `datasets.load_dataset` (e.g. `cache_dir`, `revision`).
    """
    raw = _load_raw(name_or_path, split, streaming, data_files, load_kwargs)
    rows = to_vqa_rows(raw, column_mapping, images_dir=images_dir)
    if isinstance(rows, datasets.Dataset):
        return drop_missing_images(rows, source=str(name_or_path), skip=skip_missing_images)
    check = functools.partial(_image_is_there, source=str(name_or_path), skip=skip_missing_images)
    return rows.filter(check, input_columns=["question_id", "image"])


def _load_raw(
    name_or_path: str | os.PathLike,
    split: str,
    streaming: bool,
    data_files: str | Sequence[str] | Mapping[str, Any] | None,
    load_kwargs: dict[str, Any],
) -> datasets.Dataset | datasets.IterableDataset:
    path = Path(name_or_path)
    if path.is_dir() and _is_saved_dataset(path):
        return _load_saved(path, split, streaming)
    if path.is_file():
        if path.suffix.lower() not in _BUILDER_BY_SUFFIX:
            raise VqaDataError(f"{path}: unsupported file type; expected one of {sorted(_BUILDER_BY_SUFFIX)}")
        if data_files is not None:
            raise ValueError("pass either a data file as name_or_path or data_files, not both")
        builder, data_files = _BUILDER_BY_SUFFIX[path.suffix.lower()], {split: str(path)}
    else:
        builder = str(name_or_path)
        if isinstance(data_files, (str, os.PathLike, list, tuple)):
            data_files = {split: data_files}
    return datasets.load_dataset(builder, data_files=data_files, split=split, streaming=streaming, **load_kwargs)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_saved(path: Path, split: str, streaming: bool) -> datasets.Dataset | datasets.IterableDataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise VqaDataError(f"{path}: no split {split!r}; available splits: {sorted(loaded)}")
        loaded = loaded[split]
    return loaded.to_iterable_dataset() if streaming else loaded


def to_vqa_rows(
    dataset: datasets.Dataset | datasets.IterableDataset,
    column_mapping: Mapping[str, str] | None = None,
    *,
    images_dir: str | os.PathLike | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Rename and convert an already loaded dataset into the row contract.

    `column_mapping` maps contract names (`VQA_COLUMNS`) to source column names; unmapped names
    default to themselves. `question_id`, `image` and `question` must exist; the other contract
    columns get defaults (`image_id=-1`, `answers=[]`, `None`) when the source lacks them, unless
    they were mapped explicitly. Answers given as lists of `{"answer": ...}` dicts (official
    annotations, lmms-lab/VQAv2) or as `{"answer": [...]}` are flattened to `list[str]`. An
    `Image` column is cast to `Image(decode=False)` so no pixels are ever decoded here; a string
    image column is a path, resolved against `images_dir` when relative.
    """
    mapping = _resolve_mapping(dataset, column_mapping)
    image_column = mapping["image"]
    features = dataset.features
    if features is not None and isinstance(features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    convert = functools.partial(
        _convert_batch, mapping=mapping, images_dir=os.fspath(images_dir) if images_dir is not None else None
    )
    return dataset.map(convert, batched=True, remove_columns=_column_names(dataset), features=VQA_FEATURES)


def _column_names(dataset: datasets.Dataset | datasets.IterableDataset) -> list[str]:
    """Column names, peeking at the first row of streaming sources whose features are unknown."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    return list(first) if first is not None else []


def _resolve_mapping(
    dataset: datasets.Dataset | datasets.IterableDataset, column_mapping: Mapping[str, str] | None
) -> dict[str, str | None]:
    """`{contract column: source column or None (use the default)}`, validated against the source."""
    column_mapping = dict(column_mapping or {})
    unknown = sorted(set(column_mapping) - set(VQA_COLUMNS))
    if unknown:
        raise ValueError(f"column_mapping has unknown keys {unknown}; valid keys: {list(VQA_COLUMNS)}")
    available = _column_names(dataset)
    mapping: dict[str, str | None] = {}
    for target in VQA_COLUMNS:
        source = column_mapping.get(target, target)
        if source in available:
            mapping[target] = source
        elif target in column_mapping or target in _REQUIRED_COLUMNS:
            raise VqaDataError(
                f"column {source!r} (for {target!r}) not found in the dataset; available columns: {available}"
            )
        else:
            mapping[target] = None
    return mapping


def _convert_batch(batch: dict[str, list], *, mapping: dict[str, str | None], images_dir: str | None) -> dict:
    size = len(batch[mapping["question"]])

    def column(target: str) -> list:
        source = mapping[target]
        return batch[source] if source is not None else [_COLUMN_DEFAULTS[target]] * size

    return {
        "question_id": [int(value) for value in column("question_id")],
        "image_id": [-1 if value is None else int(value) for value in column("image_id")],
        "image": [_image_reference(value, images_dir) for value in column("image")],
        "question": column("question"),
        "answers": [flatten_answers(value) for value in column("answers")],
        "multiple_choice_answer": column("multiple_choice_answer"),
        "answer_type": column("answer_type"),
    }


def flatten_answers(value: Any) -> list[str]:
    """Human answers as `list[str]` from any common layout.

    Accepts `None`, a string, a list of strings, a list of `{"answer": str, ...}` dicts, or the
    columnar `{"answer": [str, ...], ...}` that `datasets.Sequence` features produce.
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        if "answer" not in value:
            raise VqaDataError(f"answers given as a mapping need an 'answer' key, got keys {sorted(value)}")
        return flatten_answers(value["answer"])
    answers = []
    for item in value:
        answer = item.get("answer") if isinstance(item, Mapping) else item
        if not isinstance(answer, str):
            raise VqaDataError(f"cannot read an answer string from {item!r:.80}")
        answers.append(answer)
    return answers


def _image_reference(value: Any, images_dir: str | None) -> dict[str, Any]:
    """An undecoded image reference `{"bytes", "path"}` from a path or an `Image(decode=False)` dict."""
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (str, os.PathLike)):
        data, path = None, os.fspath(value)
    else:
        raise VqaDataError(
            f"image column values must be paths or {{'bytes', 'path'}} dicts, got {type(value).__name__}"
        )
    if data is None and not path:
        raise VqaDataError("an image value has neither bytes nor a path")
    if data is None and images_dir is not None and not os.path.isabs(path):
        path = os.path.join(images_dir, path)
    return {"bytes": data, "path": path}


def find_missing_images(dataset: datasets.Dataset) -> list[tuple[int, str]]:
    """`(question_id, path)` of every row whose image is a path to a file that does not exist.

    Rows with embedded bytes are never missing. Each unique path is checked once.
    """
    return [(question_id, path) for _, question_id, path in _missing_image_rows(dataset)]


def _missing_image_rows(dataset: datasets.Dataset, batch_size: int = 10_000) -> list[tuple[int, int, str]]:
    """`(row index, question_id, path)` of rows whose image file is missing."""
    exists: dict[str, bool] = {}
    missing = []
    columns = dataset.select_columns(["question_id", "image"]).cast_column("image", datasets.Image(decode=False))
    for start, batch in zip(range(0, len(columns), batch_size), columns.iter(batch_size=batch_size)):
        for offset, (question_id, image) in enumerate(zip(batch["question_id"], batch["image"])):
            if image["bytes"] is not None:
                continue
            path = image["path"]
            if path not in exists:
                exists[path] = os.path.isfile(path)
            if not exists[path]:
                missing.append((start + offset, question_id, path))
    return missing


def _image_is_there(question_id: int, image: dict[str, Any], *, source: str, skip: bool) -> bool:
    """Whether a streamed row's image is embedded or its file exists; a missing one is an error naming the path
    and question id, or, with `skip`, a warning and the row is dropped."""
    if image["bytes"] is not None or os.path.isfile(image["path"]):
        return True
    message = f"missing image file {image['path']} (question_id={question_id}) in {source}"
    if not skip:
        raise VqaDataError(f"{message}. Pass skip_missing_images=True to drop the questions whose image is missing.")
    logger.warning("Dropping a question: %s", message)
    return False


def drop_missing_images(dataset: datasets.Dataset, *, source: str = "dataset", skip: bool = False) -> datasets.Dataset:
    """Check that every path image exists: raise a `VqaDataError` listing the missing ones, or,
    with `skip=True`, return the dataset without those rows (logging a warning)."""
    missing = _missing_image_rows(dataset)
    if not missing:
        return dataset
    _report_missing_images([(question_id, path) for _, question_id, path in missing], len(dataset), source, skip)
    dropped = {index for index, _, _ in missing}
    return dataset.select([index for index in range(len(dataset)) if index not in dropped])


# ---------------------------------------------------------------------------------------------
# Synthetic shapes dataset
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------


def open_image(image: Any, *, question_id: int | None = None) -> Image.Image:
    """Open and fully decode one image: a path, a `{"bytes", "path"}` dict or a PIL image.

    Decoding is forced (`load()`), so a truncated or corrupt file fails here with a
    `VqaImageError` naming the file and the question id, not somewhere inside the processor.
    The image is returned as stored: no mode conversion, no EXIF rotation.
    """
    if isinstance(image, Image.Image):
        image.load()
        return image
    if isinstance(image, Mapping):
        data, path = image.get("bytes"), image.get("path")
    else:
        data, path = None, os.fspath(image)
    label = path if path else "<embedded image bytes>"
    try:
        if data is None:
            data = Path(path).read_bytes()
        decoded = Image.open(io.BytesIO(data))
        decoded.load()
    except Exception as exc:
        raise VqaImageError(f"cannot read image {label} (question_id={question_id}): {exc}") from exc
    return decoded


@dataclass
class VqaCollator:
    """The Trainer's `data_collator`: opens each row's image and calls the processor.

    `answer_strategy` picks the training target: `"consensus"` uses `multiple_choice_answer`;
    `"sample"` draws one human answer uniformly from `answers` every time the example is
    collated (so an answer given by 7 of 10 annotators is drawn 70 % of the time); `None`
    passes no answers (evaluation and inference). Sampling uses a `random.Random` owned by the
    collator, seeded from `seed`; in a DataLoader worker it is reseeded once with the worker id
    so that workers do not repeat each other's draws.
    The processor's output is returned unchanged.
    """

    processor: Any
    answer_strategy: str | None = "consensus"
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False)
    _worker_id: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.answer_strategy not in ANSWER_STRATEGIES:
            raise ValueError(f"unknown answer_strategy {self.answer_strategy!r}; valid: {list(ANSWER_STRATEGIES)}")
        self._rng = random.Random(self.seed)

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        images = [open_image(row["image"], question_id=row.get("question_id")) for row in rows]
        questions = [row["question"] for row in rows]
        return self.processor(images=images, text=questions, answers=self._targets(rows), return_tensors="pt")

    def _targets(self, rows: list[dict[str, Any]]) -> list[str] | None:
        if self.answer_strategy is None:
            return None
        if self.answer_strategy == "consensus":
            return [self._consensus(row) for row in rows]
        rng = self._sampling_rng()
        return [self._sample(row, rng) for row in rows]

    @staticmethod
    def _consensus(row: dict[str, Any]) -> str:
        answer = row.get("multiple_choice_answer")
        if not isinstance(answer, str):
            raise VqaDataError(
                f"question_id {row.get('question_id')} has no multiple_choice_answer, "
                "needed by answer_strategy='consensus'"
            )
        return answer

    @staticmethod
    def _sample(row: dict[str, Any], rng: random.Random) -> str:
        answers = row.get("answers")
        if not answers:
            raise VqaDataError(
                f"question_id {row.get('question_id')} has no answers, needed by answer_strategy='sample'"
            )
        return answers[rng.randrange(len(answers))]

    def _sampling_rng(self) -> random.Random:
        from torch.utils.data import get_worker_info

        worker = get_worker_info()
        if worker is not None and worker.id != self._worker_id:
            self._worker_id = worker.id
            self._rng = random.Random(f"{self.seed}:{worker.id}" if self.seed is not None else None)
        return self._rng
