"""The tiny demo model (`TinySizes`: hidden 128, DistilBERT 2 layers, a vision encoder of 4 layers at 64 px on a
4 x 4 grid, a 2-layer decoder, batch 64) with each tiny vision backbone and every fusion each decoder supports:
GPT-2 with `sequence`, `mean` and `prefix`, a Llama of the same size with `prefix`: each with two fusion layers
(none for `mean`), and the Llama also with one, as the demo has.

Step time: one training step (forward, backward, AdamW) per row, timed round-robin in one process on the same
batch, so the ratios hold on a busy machine; medians over rounds. With `--train-steps N` each row is also
trained as the demo is (`train_hf.py configs/demo.yaml`, N steps, its own cosine schedule) and its official
VQA accuracy on the demo's held-out images is reported: the same steps for every row, so a row that learns
faster per step shows it, whatever its step costs."""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from modeling_vqa_fusion import VqaFusionForConditionalGeneration  # noqa: E402
from processing_vqa_fusion import VqaFusionProcessor  # noqa: E402
from tiny_components import VISION_ENCODERS, TinySizes, build_tiny_components  # noqa: E402

# (decoder, fusion, fusion layers) per vision backbone; the last is the demo's.
DECODER_FUSIONS = [
    ("gpt2", "sequence", 2), ("gpt2", "mean", 0), ("gpt2", "prefix", 2), ("llama", "prefix", 2), ("llama", "prefix", 1)
]
DEMO_INITIALIZER_RANGE = 0.1
# The demo's sizes; GPT-2's learned positions must also hold the prefix, as train_hf gives them.
SIZES = TinySizes(max_answer_positions=128)
ACCURACIES = ("eval_vqa_accuracy", "eval_vqa_accuracy_yes_no", "eval_vqa_accuracy_number", "eval_vqa_accuracy_other")


def train_demo(
    vision: str, decoder: str, fusion: str, layers: int, steps: int, output_dir: Path, data_dir: Path
) -> dict:
    """The demo recipe with these parts for `steps` steps, as a user runs it; its `eval_results.json`."""
    command = [
        sys.executable, str(common.ROOT / "train_hf.py"), str(common.ROOT / "configs" / "demo.yaml"),
        "--tiny_vision_encoder", vision, "--tiny_decoder", decoder, "--fusion", fusion,
        "--fusion_layers", str(layers), "--max_steps", str(steps),
        "--synthetic_data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--show_examples", "0", "--disable_tqdm", "true",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=common.ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    return json.loads((output_dir / "eval_results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=10)
    parser.add_argument("--batch-size", type=int, default=64, help="the demo's batch (64)")
    parser.add_argument("--vision", nargs="+", default=["vit", "dinov2", "swin", "convnext", "resnet"],
                        choices=VISION_ENCODERS, help="tiny vision backbones")  # fmt: skip
    parser.add_argument("--train-steps", type=int, default=0, help="also train each row this many demo steps")
    parser.add_argument("--train-dir", type=Path, default=Path("outputs/bench_fusions"),
                        help="where the trained rows and the demo's data go")  # fmt: skip
    args = parser.parse_args()
    settings = common.settings_from(args)
    batch_size = 2 if settings.quick else args.batch_size
    report = common.Report(settings, "The tiny demo model per vision backbone, decoder and fusion")
    questions, answers = common.questions_and_answers(batch_size)
    rows = [(vision, *row) for vision in args.vision for row in DECODER_FUSIONS]
    steps, cells = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for vision, decoder, fusion, layers in rows:
            parts = build_tiny_components(
                Path(folder) / f"{vision}-{decoder}", questions, common.ANSWERS, SIZES, vision=vision, decoder=decoder
            )
            torch.manual_seed(0)
            model = VqaFusionForConditionalGeneration.from_pretrained_components(
                **parts,
                fusion=fusion,
                fusion_layers=layers,
                initializer_range=DEMO_INITIALIZER_RANGE,
            ).to(settings.device)
            processor = VqaFusionProcessor.from_pretrained_components(**parts)
            batch = processor(images=common.random_images(batch_size), text=questions, answers=answers)
            batch = {name: value.to(settings.device) for name, value in batch.items()}
            with torch.no_grad():
                tokens = model.encoder(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
            label = f"{vision} {decoder} {fusion} {layers}"
            cells[label] = [vision, decoder, fusion, str(layers), str(tokens.last_hidden_state.shape[1])]
            steps[label] = common.fused_step(settings, model.train(), batch)
    times = common.time_interleaved(steps, settings.device, settings.repeats, warmup=1)
    baseline = common.median(times["vit gpt2 sequence 2"]) if "vit gpt2 sequence 2" in times else None
    header = ["vision", "decoder", "fusion", "fusion layers", "fused tokens", "step s (median)", "vs vit gpt2 sequence"]
    for label, values in times.items():
        cells[label] += [f"{common.median(values):.3f}", f"{common.median(values) / baseline:.2f}x" if baseline else "-"]
    if args.train_steps:
        header += ["accuracy", "yes/no", "number", "other"]
        for row, label in zip(rows, times):
            results = train_demo(
                *row, args.train_steps, args.train_dir / label.replace(" ", "-"), args.train_dir / "shapes"
            )
            cells[label] += [f"{results.get(name, float('nan')):.2f}" for name in ACCURACIES]
    report.add(
        f"batch {batch_size}, {SIZES.image_size}-px images, step medians of {settings.repeats} rounds"
        + (f"; accuracy after {args.train_steps} demo steps (train_hf.py configs/demo.yaml)" if args.train_steps else "")
    )
    report.table(header, list(cells.values()))
    report.finish(
        "SUMMARY step time vs vit gpt2 sequence: "
        + ", ".join(f"{label} {cells[label][6]}" for label in times)
    )


if __name__ == "__main__":
    main()
