"""Where VQA examples come from: the official files and any `datasets` source, as rows of one contract.

Every source in this module yields rows with the same contract, which the training script and
the collator (`vqa_collator.py`) rely on:

    {
        "question_id": int,
        "image_id": int,                      # -1 when the source does not know it
        "image": {"bytes": bytes | None, "path": str | None},   # datasets.Image(decode=False)
        "question": str,
        "answers": list[str],                 # the human answers (10 in VQA v2, [] if unlabelled)
        "multiple_choice_answer": str | None, # the consensus answer
        "answer_type": str | None,            # any label: VQA v2 has "yes/no", "number", "other"
    }

Images are never decoded or stored as pixels in a dataset: the image column holds a path (or the
undecoded bytes of sources that embed their images), and only the collator opens an image, one
batch at a time. So memory does not grow with the number of examples, only with the metadata.

Sources:
- `load_vqa_files`: the official VQA v2 question/annotation JSON files plus a COCO image folder.
- `load_vqa_dataset`: any `datasets` source (hub id, local parquet/json/csv/arrow files, a
  `save_to_disk` folder), renamed into the contract by a column mapping; optionally streaming.
The offline synthetic shapes dataset (`shapes_data.py`) is written in the official layout and read
with `load_vqa_files`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import datasets

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

# Contract columns a source must provide; the others are derived or get a default when the source lacks them
# (see `to_vqa_rows`).
_REQUIRED_COLUMNS = ("image", "question")
# A source with one answer per question and no list of human answers: that answer stands for the ten
# annotators of VQA v2, so the official accuracy of a prediction is its exact match after normalisation.
ANNOTATORS = 10
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
    naming, `data_subtype` from the questions file; test-dev questions, `test-dev2015`, use the
    test images, `COCO_test2015_*.jpg`), then as `<images_dir>/<image_id>.<ext>` for any of
    `IMAGE_EXTENSIONS`. Missing images are found here, before any training starts: they
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
    image_subtype = coco_image_subtype(data_subtype) if data_subtype else None
    located = {}
    for image_id in image_ids:
        coco_name = f"COCO_{image_subtype}_{image_id:012d}.jpg" if image_subtype else None
        if coco_name and coco_name in names:
            located[image_id] = (os.path.join(root, coco_name), True)
        elif image_id in by_id:
            located[image_id] = (os.path.join(root, by_id[image_id]), True)
        else:
            located[image_id] = (os.path.join(root, coco_name or f"{image_id}.jpg"), False)
    return located


def coco_image_subtype(data_subtype: str) -> str:
    """The subtype in the COCO names of a split's images: its own, except that test-dev questions
    (`test-dev2015`) ask about a subset of the test images (`test2015/COCO_test2015_*.jpg`)."""
    return re.sub(r"^test-dev", "test", data_subtype)


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
    default to themselves. `image` and `question` must exist, and so must every column mapped
    explicitly; the source's other columns are ignored. What the source lacks is derived or given a default:
    - `question_id`: the row's position in the split (0, 1, ...), so predictions can be joined
      back to the source;
    - `answers`: `[multiple_choice_answer] * ANNOTATORS` (one answer standing for every
      annotator: the official accuracy is then its exact match), or `[]` when there is no answer;
    - `multiple_choice_answer`: the most common of `answers` (how VQA v2 defines it), or `None`;
    - `image_id`: -1; `answer_type`: `None`.
    Answers given as lists of `{"answer": ...}` dicts (official annotations, lmms-lab/VQAv2) or as
    `{"answer": [...]}` are flattened to `list[str]`. An `Image` column is cast to
    `Image(decode=False)` so no pixels are ever decoded here; a string image column is a path,
    resolved against `images_dir` when relative.
    """
    mapping = _resolve_mapping(dataset, column_mapping)
    image_column = mapping["image"]
    features = dataset.features
    if features is not None and isinstance(features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    convert = functools.partial(
        _convert_batch, mapping=mapping, images_dir=os.fspath(images_dir) if images_dir is not None else None
    )
    return dataset.map(
        convert, batched=True, with_indices=True, remove_columns=_column_names(dataset), features=VQA_FEATURES
    )


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


def _convert_batch(
    batch: dict[str, list], indices: list[int], *, mapping: dict[str, str | None], images_dir: str | None
) -> dict:
    def column(target: str) -> list:
        source = mapping[target]
        return batch[source] if source is not None else [_COLUMN_DEFAULTS[target]] * len(indices)

    answers = [flatten_answers(value) for value in column("answers")]
    consensus = column("multiple_choice_answer")
    if mapping["answers"] is None:
        answers = [[answer] * ANNOTATORS if answer else [] for answer in consensus]
    if mapping["multiple_choice_answer"] is None:
        consensus = [Counter(row).most_common(1)[0][0] if row else None for row in answers]
    return {
        "question_id": [int(value) for value in column("question_id")] if mapping["question_id"] else indices,
        "image_id": [-1 if value is None else int(value) for value in column("image_id")],
        "image": [_image_reference(value, images_dir) for value in column("image")],
        "question": column("question"),
        "answers": answers,
        "multiple_choice_answer": consensus,
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
