"""The processor: any image mode to the same pixels a viewer sees, questions, answer labels and decoding."""

import io
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoTokenizer, GPT2TokenizerFast, T5Config

from conftest import solid
from processing_vqa_fusion import VqaFusionProcessor, to_rgb


def pixels(processor, image):
    return processor(images=[image], text=["What color is the square?"])["pixel_values"][0]


def with_info(image: Image.Image, **info) -> Image.Image:
    image.info.update(info)
    return image


def with_palette(image: Image.Image) -> Image.Image:
    image.putpalette([200, 0, 0, 0, 0, 200] + [0] * 762)
    return image


# A viewer's colour for every mode: alpha and colour keys composited on white, 16- and 32-bit integers and
# floats scaled to 8 bits, rounded and clipped.
IMAGE_MODES = {
    "L": (lambda: Image.new("L", (8, 6), 128), (128, 128, 128)),
    "LA": (lambda: Image.new("LA", (8, 6), (128, 255)), (128, 128, 128)),
    "LA-transparent": (lambda: Image.new("LA", (8, 6), (128, 0)), (255, 255, 255)),
    "La-transparent": (lambda: Image.new("La", (8, 6), (0, 0)), (255, 255, 255)),
    "La": (lambda: Image.new("La", (8, 6), (100, 255)), (100, 100, 100)),
    "PA-transparent": (lambda: with_palette(Image.new("PA", (8, 6), (1, 0))), (255, 255, 255)),
    "RGBA": (lambda: Image.new("RGBA", (8, 6), (10, 20, 30, 255)), (10, 20, 30)),
    "RGBA-transparent": (lambda: Image.new("RGBA", (8, 6), (10, 20, 30, 0)), (255, 255, 255)),
    "RGBa-transparent": (lambda: Image.new("RGBa", (8, 6), (0, 0, 0, 0)), (255, 255, 255)),
    "RGB-colour-key": (lambda: with_info(Image.new("RGB", (8, 6), (10, 20, 30)), transparency=(10, 20, 30)), (255, 255, 255)),
    "L-colour-key": (lambda: with_info(Image.new("L", (8, 6), 128), transparency=128), (255, 255, 255)),
    "1-colour-key": (lambda: with_info(Image.new("1", (8, 6), 0), transparency=0), (255, 255, 255)),
    "CMYK": (lambda: Image.new("CMYK", (8, 6), (0, 255, 255, 0)), (255, 0, 0)),
    "I;16": (lambda: Image.new("I;16", (8, 6), 65535), (255, 255, 255)),
    "I;16-black": (lambda: Image.new("I;16", (8, 6), 0), (0, 0, 0)),
    "I": (lambda: Image.new("I", (8, 6), 32896), (128, 128, 128)),
    "I-negative": (lambda: Image.new("I", (8, 6), -1000), (0, 0, 0)),
    "I-above-16-bit": (lambda: Image.new("I", (8, 6), 100_000), (255, 255, 255)),
    "F-unit": (lambda: Image.new("F", (8, 6), 0.5), (128, 128, 128)),
    "F-unit-0.8": (lambda: Image.new("F", (8, 6), 0.8), (204, 204, 204)),
    # 0.3 is stored as 0.30000001, and 255 times that is 76.500003 (76.5 in float32 arithmetic).
    "F-unit-0.3": (lambda: Image.new("F", (8, 6), 0.3), (77, 77, 77)),
    "F-unit-1": (lambda: Image.new("F", (8, 6), 1.0), (255, 255, 255)),
    "F-255": (lambda: Image.new("F", (8, 6), 200.0), (200, 200, 200)),
    "F-255-1.5": (lambda: Image.new("F", (8, 6), 1.5), (2, 2, 2)),
    "F-above-255": (lambda: Image.new("F", (8, 6), 300.0), (255, 255, 255)),
    "1x1": (lambda: Image.new("RGB", (1, 1), (1, 2, 3)), (1, 2, 3)),
    "3-rows": (lambda: Image.new("RGB", (40, 3), (200, 100, 50)), (200, 100, 50)),
}


@pytest.mark.parametrize("make_image, same_as", IMAGE_MODES.values(), ids=IMAGE_MODES.keys())
def test_every_image_mode_becomes_the_rgb_a_viewer_sees(processor, make_image, same_as):
    """Compared with a plain RGB image of the colour a viewer sees, of another size (a 1x1 or 3-row image must
    not be taken for channels-first)."""
    image = make_image()
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(Image.new("RGB", image.size, same_as)))
    expected = Image.new("RGB", (37, 23), same_as)
    torch.testing.assert_close(pixels(processor, image), pixels(processor, expected))


def test_an_empty_image_converts_to_an_empty_rgb_image():
    """`to_rgb` is total (the processor itself refuses empty images, naming them)."""
    for mode in ("F", "I", "RGBA", "RGB"):
        assert to_rgb(Image.new(mode, (0, 3))).size == (0, 3)


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
        (dict(images=[None], text=["What?"]), "images[0] is NoneType, expected a PIL image"),
        (dict(images=["cat.jpg"], text=["What?"]), "images[0] is str, expected a PIL image"),
        (dict(images=[Image.new("RGB", (0, 5))], text=["What?"]), "images[0] is empty: 0x5 pixels"),
        (dict(images=[solid((1, 1, 1))], text=None), "text (the questions) must be given"),
        (dict(images=[solid((1, 1, 1))], text=["   "]), "text[0] is '   ': every question must be a non-empty string"),
        (dict(images=[solid((1, 1, 1))], text=[None]), "text[0] is None: every question must be a non-empty string"),
        (dict(images=[solid((1, 1, 1))] * 2, text=["What?"]), "got 2 images for 1 questions: give one image per question"),
        (dict(images=[solid((1, 1, 1))], text=["What?"], answers=[""]), "answers[0] is '': every answer must be a non-empty string"),
        (dict(images=[solid((1, 1, 1))], text=["What?"], answers=["a", "b"]), "got 2 answers for 1 questions"),
    ],
)
def test_bad_inputs_raise_clear_errors(processor, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        processor(**kwargs)


def test_a_single_image_and_question_need_no_lists(processor):
    image = solid((5, 50, 150))
    single = processor(images=image, text="What color is the square?", answers="red")
    listed = processor(images=[image], text=["What color is the square?"], answers=["red"])
    assert single.keys() == listed.keys()
    for key in listed:
        assert torch.equal(single[key], listed[key]), key


def test_max_answer_length_keeps_room_for_eos(processor):
    parts = dict(image_processor=processor.image_processor, tokenizer=processor.tokenizer, question_tokenizer=processor.question_tokenizer)
    eos_only = VqaFusionProcessor(**parts, max_answer_length=1)
    assert eos_only.encode_answers(["a very long answer"]) == [[processor.tokenizer.eos_token_id]]
    with pytest.raises(ValueError, match=r"^max_answer_length must be at least 1 \(room for EOS\), got 0$"):
        VqaFusionProcessor(**parts, max_answer_length=0)


def test_unknown_keyword_arguments_are_refused(processor):
    with pytest.raises(TypeError, match="Unexpected keyword argument colour"):
        VqaFusionProcessor(processor.image_processor, processor.tokenizer, processor.question_tokenizer, colour="red")


def test_a_decoder_without_pad_token_pads_with_eos_and_one_with_its_own_keeps_it(tiny_parts):
    assert AutoTokenizer.from_pretrained(tiny_parts["decoder"]).pad_token is None, "like gpt2"
    processor = VqaFusionProcessor.from_pretrained_components(**tiny_parts)
    assert processor.tokenizer.pad_token == processor.tokenizer.eos_token
    own = AutoTokenizer.from_pretrained(tiny_parts["decoder"])
    own.add_special_tokens({"pad_token": "<pad>"})
    kept = VqaFusionProcessor(processor.image_processor, own, processor.question_tokenizer)
    assert kept.tokenizer.pad_token == "<pad>"


def test_answers_get_no_special_tokens_from_a_decoder_tokenizer_that_adds_them(processor, tiny_parts):
    """Decoders like Llama's add BOS to every text they encode; labels must still be the answer and EOS."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_parts["decoder"])
    eos = tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.eos_token} $A", special_tokens=[(tokenizer.eos_token, eos)]
    )
    red = tokenizer(" red", add_special_tokens=False)["input_ids"]
    assert tokenizer(" red")["input_ids"] == [eos] + red
    adding = VqaFusionProcessor(processor.image_processor, tokenizer, processor.question_tokenizer)
    assert adding.encode_answers(["red"]) == [red + [eos]]


def test_processor_arguments_reach_every_part(tiny_parts, tmp_path):
    """`from_pretrained_components(..., **kwargs)` passes them to each part's loader: here `cache_dir` and
    `local_files_only`, with the parts stored as hub ids in a hub cache."""
    cache = tmp_path / "hub"
    names = {}
    for part, folder in tiny_parts.items():
        repository = cache / f"models--tiny--{part}"
        shutil.copytree(folder, repository / "snapshots" / "0123456789abcdef")
        (repository / "refs").mkdir()
        (repository / "refs" / "main").write_text("0123456789abcdef")
        names[part] = f"tiny/{part}"
    processor = VqaFusionProcessor.from_pretrained_components(**names, cache_dir=str(cache), local_files_only=True)
    reference = VqaFusionProcessor.from_pretrained_components(**tiny_parts)
    arguments = dict(images=[solid((5, 50, 150))], text=["Is there a red circle?"], answers=["yes"])
    for key, value in reference(**arguments).items():
        assert torch.equal(processor(**arguments)[key], value), key


def test_an_encoder_without_position_embeddings_keeps_the_tokenizers_limit(tiny_parts, tmp_path):
    """A T5-like encoder (relative positions, no `max_position_embeddings`): nothing to clamp to."""
    folder = tmp_path / "question_encoder"
    shutil.copytree(tiny_parts["question_encoder"], folder)
    T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64).save_pretrained(folder)
    assert not hasattr(AutoConfig.from_pretrained(folder), "max_position_embeddings")
    processor = VqaFusionProcessor.from_pretrained_components(**{**tiny_parts, "question_encoder": str(folder)})
    assert processor.question_tokenizer.model_max_length == AutoTokenizer.from_pretrained(folder).model_max_length


def test_batch_decode_returns_clean_answers_and_reads_minus_100_as_padding(processor):
    tokenizer = processor.tokenizer
    ids = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    rows = torch.tensor([[tokenizer.eos_token_id] + ids + [tokenizer.eos_token_id, -100]])
    assert processor.batch_decode(rows) == ["yes"]
    assert processor.post_process_image_text_to_text(rows) == ["yes"]
    assert processor.batch_decode(rows, skip_special_tokens=False) == [f"{tokenizer.eos_token} yes{tokenizer.eos_token * 2}"]
    assert processor.post_process_image_text_to_text(rows, skip_special_tokens=False) == processor.batch_decode(
        rows, skip_special_tokens=False
    )


def test_decoding_options_reach_the_tokenizer(processor, tiny_parts):
    """transformers 5 skips `clean_up_tokenization_spaces` for BPE unless the tokenizer was made to allow it: with
    such a tokenizer, the option changes the answer only if the processor passes it on."""
    tokenizer = AutoTokenizer.from_pretrained(
        tiny_parts["decoder"], clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True
    )
    allowing = VqaFusionProcessor(processor.image_processor, tokenizer, processor.question_tokenizer)
    ids = tokenizer(" red .", add_special_tokens=False)["input_ids"]
    assert allowing.batch_decode([ids]) == ["red ."]
    assert allowing.batch_decode([ids], clean_up_tokenization_spaces=True) == ["red."]
    assert allowing.post_process_image_text_to_text([ids], clean_up_tokenization_spaces=True) == ["red."]


def test_token_id_0_is_a_token_like_any_other(processor):
    """In GPT-2's vocabulary id 0 is "!": only negative ids (label padding) are read as padding."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE({**{c: i for i, c in enumerate(alphabet)}, "<|endoftext|>": len(alphabet)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = GPT2TokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    gpt2_like = VqaFusionProcessor(processor.image_processor, tokenizer, processor.question_tokenizer)
    ids = tokenizer(" yes!", add_special_tokens=False)["input_ids"]
    assert ids[-1] == 0
    assert gpt2_like.batch_decode([ids + [tokenizer.eos_token_id, -100]]) == ["yes!"]


def test_save_and_reload_gives_identical_outputs(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = VqaFusionProcessor.from_pretrained(tmp_path)
    arguments = dict(images=[solid((5, 50, 150)), solid((1, 2, 3), (9, 9))], text=["Is there a red circle?", "What?"])
    first, second = processor(**arguments, answers=["yes", "2"]), reloaded(**arguments, answers=["yes", "2"])
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert reloaded.max_answer_length == processor.max_answer_length
