"""Attention maps on every vision backbone: the heat lands on the grid cell the decoder was made to read (its
position computed here from the backbone's layout, not by the code under test), in that cell's pixels of the
image (centre crops included), and the answers and their probabilities are those of `generate`."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from attention_quadrants import asked_corner_share  # noqa: E402
from attention_maps import answer_with_attention, processed_region
from conftest import ANSWERS, QUESTIONS, solid
from modeling_vqa_fusion import VqaFusionForConditionalGeneration
from processing_vqa_fusion import VqaFusionProcessor
from tiny_components import TinySizes, build_tiny_components

SIZES = TinySizes(
    hidden=32, heads=2, question_layers=1, vision_layers=1, decoder_layers=2, image_size=32, patch_size=8,
    max_answer_positions=64,
)
# Every vision backbone, each with a decoder and a fusion that reads positions: (vision, decoder, fusion).
PAIRINGS = {
    "vit-gpt2-sequence": ("vit", "gpt2", "sequence"),
    "clip-gpt2-sequence": ("clip", "gpt2", "sequence"),
    "convnext-gpt2-sequence": ("convnext", "gpt2", "sequence"),
    "siglip-llama-prefix": ("siglip", "llama", "prefix"),
    "dinov2registers-qwen2-prefix": ("dinov2-registers", "qwen2", "prefix"),
    "swin-llama-prefix": ("swin", "llama", "prefix"),
    "resnet-gpt2-prefix": ("resnet", "gpt2", "prefix"),
}
# Tokens before the 4 x 4 grid in each backbone's output: CLS (ViT, CLIP), CLS and 4 registers (DINOv2), none.
LEADING = {"vit": 1, "clip": 1, "dinov2-registers": 5, "siglip": 0, "swin": 0, "convnext": 0, "resnet": 0}
ROWS = COLUMNS = 4
# The part of a 60 x 30 image each image processor keeps, (top, left, bottom, right): CLIP's and DINOv2's resize
# the shortest edge to 32 and crop 32 x 32, the middle 30 x 30; ConvNeXt's (ResNet's too) resize it to
# 32 / 0.875 = 36.6 (36) and crop 32 x 32, the middle 26.7 x 26.7; the others resize the whole image.
CROP = 30 * 32 / 36
KEPT = {
    "clip": (0, 15, 30, 45),
    "dinov2-registers": (0, 15, 30, 45),
    "convnext": ((30 - CROP) / 2, 30 - CROP / 2, 30 - (30 - CROP) / 2, 30 + CROP / 2),
}
KEPT["resnet"] = KEPT["convnext"]
QUESTION = "What color is the square?"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple]:
    root = tmp_path_factory.mktemp("attention")
    result = {}
    for name, (vision, decoder, fusion) in PAIRINGS.items():
        parts = build_tiny_components(root / name, QUESTIONS, ANSWERS, SIZES, vision=vision, decoder=decoder)
        torch.manual_seed(0)
        model = VqaFusionForConditionalGeneration.from_pretrained_components(**parts, fusion=fusion).eval()
        result[name] = (model, VqaFusionProcessor.from_pretrained_components(**parts), vision)
    return result


def read_only(monkeypatch, model, positions: list[int]) -> None:
    """Make the encoder's output mask every fused token but `positions`, so the decoder can attend to nothing else."""
    encode = model.encoder.forward

    def masked(*args, **kwargs):
        output = encode(*args, **kwargs)
        keep = torch.zeros_like(output.attention_mask)
        keep[:, positions] = 1
        output.attention_mask = keep
        return output

    monkeypatch.setattr(model.encoder, "forward", masked)


@pytest.mark.parametrize("name", PAIRINGS)
def test_heat_lands_on_the_only_cell_the_decoder_may_read(models, monkeypatch, name):
    model, processor, vision = models[name]
    question_length = processor.question_tokenizer([QUESTION], return_tensors="pt")["input_ids"].shape[1]
    row, column = 0, 3
    cell = question_length + LEADING[vision] + row * COLUMNS + column
    read_only(monkeypatch, model, [1, cell])
    image = solid((200, 40, 40), size=(60, 30))  # wider than high: CLIP and DINOv2 crop its centre
    [result] = answer_with_attention(model, processor, [image], [QUESTION], max_new_tokens=3)

    expected = np.zeros((ROWS, COLUMNS))
    expected[row, column] = 1
    np.testing.assert_allclose(result.grid, expected, atol=1e-6)
    assert result.heatmap.shape == (30, 60)
    assert result.heatmap.sum() == pytest.approx(1.0, abs=1e-5)
    # The peak lies in the cell's pixels: the processed part of the image, cut into the grid.
    top, left, bottom, right = KEPT.get(vision, (0, 0, 30, 60))
    height, width = (bottom - top) / ROWS, (right - left) / COLUMNS
    peak_y, peak_x = np.unravel_index(result.heatmap.argmax(), result.heatmap.shape)
    assert top + row * height <= peak_y < top + (row + 1) * height
    assert left + column * width <= peak_x < left + (column + 1) * width
    # The question token left readable is the only one with weight; the rest went to the grid cell.
    assert result.question_weights[1] > 0 and np.all(np.delete(result.question_weights, 1) == 0)
    if model.config.fusion == "sequence":
        assert result.question_weights[1] + result.image_share == pytest.approx(1.0, abs=1e-5)
    assert model.config.decoder._attn_implementation == "sdpa", "the decoder's attention setting is restored"


@pytest.mark.parametrize("name", ["vit-gpt2-sequence", "siglip-llama-prefix"])
def test_answers_and_probabilities_are_those_of_beam_search(models, name):
    model, processor, _ = models[name]
    images = [solid((255, 0, 0)), solid((0, 0, 255), size=(50, 50))]
    questions = ["What color is the square?", "Is there a red circle?"]
    results = answer_with_attention(
        model, processor, images, questions, num_alternatives=3, max_new_tokens=4, length_penalty=0.0
    )
    inputs = processor(images=images, text=questions, return_tensors="pt")
    with torch.no_grad():
        beams = model.generate(
            **inputs, num_beams=3, num_return_sequences=3, max_new_tokens=4, length_penalty=0.0,
            output_scores=True, return_dict_in_generate=True,
        )
    texts = processor.batch_decode(beams.sequences)
    # With length_penalty 0 a beam's score is the sum of its tokens' log probabilities, EOS included.
    probabilities = beams.sequences_scores.exp().tolist()
    for index, result in enumerate(results):
        rows = range(3 * index, 3 * index + 3)
        assert result.answer == texts[rows[0]]
        assert [answer for answer, _ in result.alternatives] == [texts[row] for row in rows]
        np.testing.assert_allclose([p for _, p in result.alternatives], [probabilities[r] for r in rows], rtol=1e-4)


def test_mean_fusion_gives_its_fixed_weights_and_a_flat_map(tmp_path):
    parts = build_tiny_components(tmp_path, QUESTIONS, ANSWERS, SIZES)  # ViT: the whole image is kept
    model = VqaFusionForConditionalGeneration.from_pretrained_components(**parts, fusion="mean").eval()
    processor = VqaFusionProcessor.from_pretrained_components(**parts)
    [result] = answer_with_attention(model, processor, [solid((0, 200, 0), size=(20, 10))], ["What color?"])
    tokens = len(result.question_tokens)
    np.testing.assert_allclose(result.question_weights, np.full(tokens, 1 / (2 * tokens)), rtol=1e-6)
    assert result.image_share == pytest.approx(0.5)
    np.testing.assert_allclose(result.heatmap, np.full((10, 20), 1 / 200), rtol=1e-5)


def test_processed_region_follows_a_centre_crop(models):
    """A probe: an image whose left and right thirds are black; after CLIP's resize and centre crop, no black
    pixel is left exactly when the region says the crop is the middle third."""
    _, processor, _ = models["clip-gpt2-sequence"]
    image = solid((255, 255, 255), size=(90, 30))
    for x in list(range(0, 30)) + list(range(60, 90)):
        for y in range(30):
            image.putpixel((x, y), (0, 0, 0))
    assert processed_region(processor.image_processor, 30, 90) == (0.0, 30.0, 30.0, 60.0)
    pixels = processor(images=[image], text=["What color?"], return_tensors="pt")["pixel_values"]
    assert pixels.min() > pixels.max() - 0.5, "the crop kept black pixels"


def test_corner_measure_reads_the_quadrant_and_the_cell_the_question_names():
    heatmap = np.zeros((64, 64))
    heatmap[0:16, 48:64] = 0.75 / 256  # the top right cell
    heatmap[16:32, 32:48] = 0.25 / 256  # the cell diagonally inside it: same quadrant, another cell
    question = "What color is the object in the top right corner?"
    assert asked_corner_share(heatmap, question, cells=2) == pytest.approx(1.0)
    assert asked_corner_share(heatmap, question, cells=1) == pytest.approx(0.75)
    for other in ("top left", "bottom right", "bottom left"):
        assert asked_corner_share(heatmap, f"What shape is in the {other} corner?", cells=2) == 0
