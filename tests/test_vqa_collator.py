"""Tests for vqa_collator: images opened batch by batch, as stored, and the training targets."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import RecordingProcessor, save_image
from vqa_collator import VqaCollator


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


def test_collator_gives_the_decoder_inputs_the_model_would_build(tmp_path, processor, make_model):
    """The Trainer pops `labels` before the forward when it smooths them: the decoder inputs must already be
    in the batch, and be exactly those the model builds from the labels."""
    model = make_model()
    image = str(save_image(tmp_path / "x.jpg"))
    rows = [row(image, 1, consensus="red"), row(image, 2, consensus="a very long answer indeed")]
    batch = VqaCollator(processor, model=model)(rows)
    assert batch["decoder_input_ids"].tolist() == model.prepare_decoder_input_ids_from_labels(batch["labels"]).tolist()
    assert batch["decoder_input_ids"][0, 0] == model.config.decoder_start_token_id
    with_labels = model(**batch).loss
    labels = batch.pop("labels")
    logits = model(**batch).logits
    assert torch.allclose(model.answer_loss(logits, labels), with_labels)
    assert "decoder_input_ids" not in VqaCollator(processor, answer_strategy=None, model=model)(rows)
