"""The Trainer's data collator: rows of the `vqa_data` contract -> model inputs, one batch at a time.

Images are opened and decoded here, in the batch that needs them, never before: a dataset holds only
paths (or undecoded bytes), so memory does not grow with the number of examples.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vqa_data import VqaDataError, VqaImageError

ANSWER_STRATEGIES = ("consensus", "sample", None)


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

    With a `model` that has `prepare_decoder_input_ids_from_labels` (as `DataCollatorForSeq2Seq`
    takes one), batches with labels also carry `decoder_input_ids` `(batch, answer_length)`, the
    labels shifted right behind the decoder start token: the Trainer pops `labels` before the
    forward pass when it smooths them (`label_smoothing_factor`), so the model cannot build them.
    Otherwise the processor's output is returned unchanged.
    """

    processor: Any
    answer_strategy: str | None = "consensus"
    seed: int | None = None
    model: Any = None
    _rng: random.Random = field(init=False, repr=False)
    _worker_id: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.answer_strategy not in ANSWER_STRATEGIES:
            raise ValueError(f"unknown answer_strategy {self.answer_strategy!r}; valid: {list(ANSWER_STRATEGIES)}")
        self._rng = random.Random(self.seed)

    def __call__(self, rows: list[dict[str, Any]]) -> Any:
        images = [open_image(row["image"], question_id=row.get("question_id")) for row in rows]
        questions = [row["question"] for row in rows]
        batch = self.processor(images=images, text=questions, answers=self._targets(rows), return_tensors="pt")
        if "labels" in batch and hasattr(self.model, "prepare_decoder_input_ids_from_labels"):
            batch["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return batch

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
