"""The processor: any image mode to the same pixels a viewer sees, questions, answer labels and decoding."""

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoTokenizer

from conftest import solid
from processing_vqa_fusion import VqaFusionProcessor, to_rgb


def pixels(processor, image):
    return processor(images=[image], text=["What color is the square?"])["pixel_values"][0]


@pytest.mark.parametrize(
    "make_image, same_as",
    [
        (lambda: Image.new("L", (8, 6), 128), (128, 128, 128)),
        (lambda: Image.new("LA", (8, 6), (128, 255)), (128, 128, 128)),
        (lambda: Image.new("RGBA", (8, 6), (10, 20, 30, 255)), (10, 20, 30)),
        (lambda: Image.new("RGBA", (8, 6), (10, 20, 30, 0)), (255, 255, 255)),
        (lambda: Image.new("CMYK", (8, 6), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.new("I;16", (8, 6), 65535), (255, 255, 255)),
        (lambda: Image.new("I", (8, 6), 32896), (128, 128, 128)),
        (lambda: Image.new("F", (8, 6), 0.5), (128, 128, 128)),
        (lambda: Image.new("F", (8, 6), 200.0), (200, 200, 200)),
        (lambda: Image.new("RGB", (1, 1), (1, 2, 3)), (1, 2, 3)),
        (lambda: Image.new("RGB", (40, 3), (200, 100, 50)), (200, 100, 50)),
    ],
    ids=["L", "LA", "RGBA", "RGBA-transparent", "CMYK", "I;16", "I", "F-unit", "F-255", "1x1", "3-rows"],
)
def test_every_image_mode_becomes_the_rgb_a_viewer_sees(processor, make_image, same_as):
    """Compared with a plain RGB image of the colour a viewer sees, of another size (a 1x1 or 3-row image must
    not be taken for channels-first)."""
    image = make_image()
    expected = Image.new("RGB", (37, 23), same_as)
    torch.testing.assert_close(pixels(processor, image), pixels(processor, expected))


def test_palette_image_with_transparency(processor):
    image = Image.new("P", (8, 6), 0)
    image.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
    image.info["transparency"] = 1
    image.paste(1, (0, 0, 4, 6))
    expected = Image.new("RGB", (8, 6), (200, 0, 0))
    expected.paste((255, 255, 255), (0, 0, 4, 6))
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(expected))


def test_exif_orientation_is_applied(processor):
    upright = Image.new("RGB", (40, 20), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 0, 20, 20))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera stores for orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    assert loaded.size == (20, 40)
    assert np.array_equal(np.asarray(to_rgb(loaded)), np.asarray(upright))


def test_huge_image_is_resized(processor):
    size = processor.image_processor.size
    values = pixels(processor, Image.new("RGB", (8000, 6000), (0, 255, 0)))
    assert values.shape == (3, size["height"], size["width"])


def test_labels_are_answer_tokens_then_eos_padded_with_minus_100(processor):
    batch = processor(
        images=[solid((1, 1, 1))] * 2, text=["What color is the square?"] * 2, answers=["red", "a very long answer"]
    )
    tokenizer = processor.tokenizer
    long_ids = tokenizer(" a very long answer", add_special_tokens=False)["input_ids"]
    red_ids = tokenizer(" red", add_special_tokens=False)["input_ids"]
    assert batch["labels"][1].tolist() == long_ids + [tokenizer.eos_token_id]
    assert batch["labels"][0].tolist() == red_ids + [tokenizer.eos_token_id] + [-100] * (len(long_ids) - len(red_ids))


def test_long_answers_are_truncated_but_keep_eos(tiny_parts):
    processor = VqaFusionProcessor.from_pretrained_components(**tiny_parts)
    processor.max_answer_length = 3
    labels = processor(images=[solid((1, 1, 1))], text=["What?"], answers=["a very long answer indeed " * 50])["labels"]
    assert labels.shape == (1, 3)
    assert labels[0, -1].item() == processor.tokenizer.eos_token_id


def test_long_questions_are_truncated_to_the_question_encoder_limit(tiny_parts, tmp_path):
    """A tokenizer that allows more tokens than the encoder has positions (distilbert-base-uncased's both say
    512, but many do not agree) is clamped to the encoder's `max_position_embeddings`."""
    limit = AutoConfig.from_pretrained(tiny_parts["question_encoder"]).max_position_embeddings
    folder = tmp_path / "question_encoder"
    shutil.copytree(tiny_parts["question_encoder"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = 4 * limit
    tokenizer.save_pretrained(folder)
    long_question = "how many red circles " * 2000
    assert len(AutoTokenizer.from_pretrained(folder)(long_question, truncation=True)["input_ids"]) == 4 * limit

    processor = VqaFusionProcessor.from_pretrained_components(**{**tiny_parts, "question_encoder": str(folder)})
    batch = processor(images=[solid((1, 1, 1))], text=[long_question])
    assert batch["input_ids"].shape[1] == limit
    assert batch["input_ids"][0, -1].item() == processor.question_tokenizer.sep_token_id


def test_non_ascii_questions_are_encoded_to_known_tokens(processor):
    """Accented Latin, CJK and full-width punctuation the tokenizer was trained on (conftest's questions) become
    their own tokens, never [UNK], and decode back to the (lower-cased, accent-stripped) question; a character
    it never saw is [UNK] alone."""
    tokenizer = processor.question_tokenizer
    questions = ["¿Qué forma tiene el triángulo?", "这是什么颜色？", "Is there a circle? 🟥"]
    batch = processor(images=[solid((1, 1, 1))] * 3, text=questions)
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert [tokenizer.unk_token_id in row for row in rows] == [False, False, True]
    assert rows[2].count(tokenizer.unk_token_id) == 1
    decoded = [tokenizer.decode(row, skip_special_tokens=True).replace(" ", "") for row in rows[:2]]
    assert decoded == ["¿queformatieneeltriangulo?", "这是什么颜色？"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(images=[None], text=["What?"]), r"images\[0\] is NoneType"),
        (dict(images=["cat.jpg"], text=["What?"]), r"images\[0\] is str"),
        (dict(images=[solid((1, 1, 1))], text=None), "text"),
        (dict(images=[solid((1, 1, 1))], text=["   "]), r"text\[0\]"),
        (dict(images=[solid((1, 1, 1))], text=[None]), r"text\[0\]"),
        (dict(images=[solid((1, 1, 1))] * 2, text=["What?"]), "2 images for 1 questions"),
        (dict(images=[solid((1, 1, 1))], text=["What?"], answers=[""]), r"answers\[0\]"),
        (dict(images=[solid((1, 1, 1))], text=["What?"], answers=["a", "b"]), "2 answers for 1 questions"),
    ],
)
def test_bad_inputs_raise_clear_errors(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_batch_decode_returns_clean_answers_and_reads_minus_100_as_padding(processor):
    tokenizer = processor.tokenizer
    ids = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    rows = torch.tensor([[tokenizer.eos_token_id] + ids + [tokenizer.eos_token_id, -100]])
    assert processor.batch_decode(rows) == ["yes"]


def test_save_and_reload_gives_identical_outputs(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = VqaFusionProcessor.from_pretrained(tmp_path)
    arguments = dict(images=[solid((5, 50, 150)), solid((1, 2, 3), (9, 9))], text=["Is there a red circle?", "What?"])
    first, second = processor(**arguments, answers=["yes", "2"]), reloaded(**arguments, answers=["yes", "2"])
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert reloaded.max_answer_length == processor.max_answer_length
