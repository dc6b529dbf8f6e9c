"""Shared fixtures: tiny components saved to a temporary folder once per session, loaded through the same
`from_pretrained_components` path a user takes with hub ids."""

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modeling_vqa_fusion import VqaFusionForConditionalGeneration  # noqa: E402
from processing_vqa_fusion import VqaFusionProcessor  # noqa: E402
from tiny_components import TinySizes, build_tiny_components  # noqa: E402

# Non-ASCII questions too, so that the question tokenizer knows their characters.
QUESTIONS = [
    "What color is the square?",
    "Is there a red circle?",
    "How many triangles are there?",
    "¿Qué forma tiene el triángulo?",
    "这是什么颜色？",
]
ANSWERS = ["red", "green", "blue", "yellow", "yes", "no", "0", "1", "2", "3", "a very long answer indeed"]
TEST_SIZES = TinySizes(hidden=32, heads=2, question_layers=1, vision_layers=1, decoder_layers=2, image_size=32)


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory) -> dict[str, str]:
    """Folders of a tiny DistilBERT, ViT and GPT-2 with their tokenizers and image processor."""
    return build_tiny_components(tmp_path_factory.mktemp("components"), QUESTIONS, ANSWERS, TEST_SIZES)


@pytest.fixture(scope="session")
def processor(tiny_parts) -> VqaFusionProcessor:
    return VqaFusionProcessor.from_pretrained_components(**tiny_parts)


@pytest.fixture
def make_model(tiny_parts):
    """A fresh model from the tiny parts, with a fixed seed for its new weights."""

    def make(fusion: str = "sequence", seed: int = 0, fusion_layers: int = 0) -> VqaFusionForConditionalGeneration:
        torch.manual_seed(seed)
        return VqaFusionForConditionalGeneration.from_pretrained_components(
            **tiny_parts, fusion=fusion, fusion_layers=fusion_layers
        )

    return make


def solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    """A plain RGB image of one colour."""
    return Image.new("RGB", size, color)


def write_json(path: Path, document) -> Path:
    path.write_text(json.dumps(document))
    return path


def save_image(path: Path, color=(200, 30, 30), size=(8, 8), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)
    return path


class RecordingProcessor:
    """Stands in for the real processor: records every call and returns a marker."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return {"call": len(self.calls)}
