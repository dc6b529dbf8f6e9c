"""Does the decoder read where the question points? On the shapes data's held-out corner questions ("What color
is the object in the top left corner?", "What shape is in the bottom right corner?"), the share of each answer's
attention heatmap (`attention_maps.py`) that falls in the asked quadrant of the image (chance: 25 %) and in the
asked corner cell (one of the 4 x 4 cells the scenes are drawn on; chance: 6.25 %), with the answers' accuracy.

    python benchmarks/attention_quadrants.py outputs/demo                      # the demo's data in data/shapes
    python benchmarks/attention_quadrants.py MODEL --data_dir DIR --batch_size 64
"""

import argparse
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from attention_maps import answer_with_attention  # noqa: E402
from modeling_vqa_fusion import VqaFusionForConditionalGeneration  # noqa: E402
from processing_vqa_fusion import VqaFusionProcessor  # noqa: E402
from shapes_data import GRID  # noqa: E402
from vqa_data import load_vqa_files  # noqa: E402

CORNER = re.compile(r"\b(top|bottom) (left|right) corner\b")
SPLIT = "shapes_val"


def asked_corner_share(heatmap: np.ndarray, question: str, cells: int) -> float:
    """The part of a `(height, width)` heatmap in the corner the question names, `cells` grid cells of
    `GRID` x `GRID` high and wide: 2 for the quadrant, 1 for the corner cell."""
    vertical, horizontal = CORNER.search(question).groups()
    height, width = heatmap.shape[0] * cells // GRID, heatmap.shape[1] * cells // GRID
    rows = slice(0, height) if vertical == "top" else slice(heatmap.shape[0] - height, None)
    columns = slice(0, width) if horizontal == "left" else slice(heatmap.shape[1] - width, None)
    return float(heatmap[rows, columns].sum())


def measure(model_path: str, data_dir: Path, batch_size: int) -> dict[str, float]:
    model = VqaFusionForConditionalGeneration.from_pretrained(model_path).eval()
    processor = VqaFusionProcessor.from_pretrained(model_path, trust_remote_code=False)
    rows = load_vqa_files(
        data_dir / f"v2_OpenEnded_mscoco_{SPLIT}_questions.json",
        data_dir / f"v2_mscoco_{SPLIT}_annotations.json",
        data_dir / SPLIT,
    ).filter(lambda row: CORNER.search(row["question"]) is not None)
    if len(rows) == 0:
        raise ValueError(f"no corner questions in {data_dir}: give the folder of the demo's shapes data")
    quadrant, cell, correct = [], [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        images = [Image.open(image["path"]).convert("RGB") for image in batch["image"]]
        with torch.no_grad():
            results = answer_with_attention(model, processor, images, batch["question"])
        for result, truth in zip(results, batch["multiple_choice_answer"]):
            quadrant.append(asked_corner_share(result.heatmap, result.question, 2))
            cell.append(asked_corner_share(result.heatmap, result.question, 1))
            correct.append(result.answer == truth)
    return {
        "questions": len(rows),
        "accuracy": 100 * statistics.mean(correct),
        "asked_quadrant_share": 100 * statistics.mean(quadrant),
        "asked_quadrant_share_median": 100 * statistics.median(quadrant),
        "asked_quadrant_above_chance": 100 * statistics.mean(share > 0.25 for share in quadrant),
        "asked_cell_share": 100 * statistics.mean(cell),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="outputs/demo", help="a trained model: folder or hub id")
    parser.add_argument("--data_dir", type=Path, default=Path("data/shapes"), help="the shapes data (make_shapes_vqa)")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    results = measure(args.model, args.data_dir, args.batch_size)
    print(f"{results['questions']} held-out corner questions, answered correctly: {results['accuracy']:.1f} %")
    print(f"heat in the asked quadrant: mean {results['asked_quadrant_share']:.1f} % (chance 25 %), "
          f"median {results['asked_quadrant_share_median']:.1f} %; above chance for "
          f"{results['asked_quadrant_above_chance']:.1f} % of the questions")
    print(f"heat in the asked corner cell: mean {results['asked_cell_share']:.1f} % (chance 6.25 %)")


if __name__ == "__main__":
    main()
