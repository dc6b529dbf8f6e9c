"""One training step (forward, backward, AdamW) of the tiny demo model (`TinySizes`: hidden 128, DistilBERT 2
layers, ViT 4 layers at 64 px, a 2-layer decoder, batch 64) with every fusion each decoder supports: GPT-2 with
`sequence`, `mean` and `prefix`, a Llama of the same size with `prefix`. Fusion layers as in the demo (two; none
for `mean`). The steps are timed round-robin in one process on the same batch, so their ratios hold on a busy
machine; medians over rounds."""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from modeling_vqa_fusion import VqaFusionForConditionalGeneration  # noqa: E402
from processing_vqa_fusion import VqaFusionProcessor  # noqa: E402
from tiny_components import TinySizes, build_tiny_components  # noqa: E402

ROWS = [("gpt2", "sequence"), ("gpt2", "mean"), ("gpt2", "prefix"), ("llama", "prefix")]
DEMO_FUSION_LAYERS = 2
DEMO_INITIALIZER_RANGE = 0.1
# The demo's sizes; GPT-2's learned positions must also hold the prefix (question + 17 image tokens + answer).
SIZES = TinySizes(max_answer_positions=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=10)
    parser.add_argument("--batch-size", type=int, default=64, help="the demo's batch (64)")
    args = parser.parse_args()
    settings = common.settings_from(args)
    batch_size = 2 if settings.quick else args.batch_size
    report = common.Report(settings, "Train step of the tiny demo model per decoder and fusion")
    questions, answers = common.questions_and_answers(batch_size)
    steps, rows = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for decoder, fusion in ROWS:
            parts = build_tiny_components(Path(folder) / decoder, questions, common.ANSWERS, SIZES, decoder=decoder)
            torch.manual_seed(0)
            model = VqaFusionForConditionalGeneration.from_pretrained_components(
                **parts,
                fusion=fusion,
                fusion_layers=0 if fusion == "mean" else DEMO_FUSION_LAYERS,
                initializer_range=DEMO_INITIALIZER_RANGE,
            ).to(settings.device)
            processor = VqaFusionProcessor.from_pretrained_components(**parts)
            batch = processor(images=common.random_images(batch_size), text=questions, answers=answers)
            batch = {name: value.to(settings.device) for name, value in batch.items()}
            with torch.no_grad():
                tokens = model.encoder(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
            label = f"{decoder} {fusion}"
            parameters = sum(p.numel() for p in model.parameters()) / 1e6
            rows[label] = [decoder, fusion, str(tokens.last_hidden_state.shape[1]), f"{parameters:.2f}M"]
            steps[label] = common.fused_step(settings, model.train(), batch)
    times = common.time_interleaved(steps, settings.device, settings.repeats, warmup=1)
    baseline = common.median(times["gpt2 sequence"])
    report.add(f"batch {batch_size}, {SIZES.image_size}-px images, medians of {settings.repeats} rounds")
    report.table(
        ["decoder", "fusion", "fused tokens", "parameters", "step s (median)", "vs gpt2 sequence"],
        [
            [*rows[label], f"{common.median(values):.3f}", f"{common.median(values) / baseline:.2f}x"]
            for label, values in times.items()
        ],
    )
    report.finish(
        "SUMMARY step time vs gpt2 sequence: "
        + ", ".join(f"{label} {common.median(values) / baseline:.2f}x" for label, values in times.items())
    )


if __name__ == "__main__":
    main()
