"""Examples per second of the training data path (JPEG decode + processor + collate, through `VqaCollator` and a
torch DataLoader over a `datasets.Dataset` of rows) against the model's training throughput at the same batch
size, and the data path's peak memory for a small and a ten times larger dataset.

The images are photo-like 640x480 JPEGs (smooth multi-scale noise plus grain, about 60-110 KB each) written to a
temporary folder; the rows follow `vqa_data`'s contract (`VQA_FEATURES`, the image column an undecoded path), so
that many rows point to the same few hundred files. Each peak-memory measurement runs in a fresh subprocess that
iterates its whole dataset through the collator (`VmHWM`, the process's RSS high-water mark).
"""

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import common  # noqa: E402
from vqa_data import VQA_FEATURES, VqaCollator  # noqa: E402

MEMORY_TOLERANCE = 0.10
PROCESS_NAMES = {"main": "main process", "worker": "largest worker"}
# Noise octaves (cells across the width, amplitude in grey levels): large shapes down to texture.
OCTAVES = ((4, 90.0), (16, 50.0), (64, 30.0), (160, 14.0))


def photo_like(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image.Image:
    """A random RGB image with a photo's spectrum: bicubic-upsampled noise at several scales, plus sensor grain."""
    pixels = np.full((height, width, 3), 128.0, dtype=np.float32)
    for cells, amplitude in OCTAVES:
        coarse = rng.normal(0.0, 1.0, (3, max(2, cells * height // width), cells)).astype(np.float32)
        channels = [np.asarray(Image.fromarray(plane).resize((width, height), Image.BICUBIC)) for plane in coarse]
        pixels += amplitude * np.stack(channels, axis=-1)
    pixels += rng.normal(0.0, rng.uniform(1.0, 5.0), pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` photo-like 640x480 JPEGs (quality 85-95) in `folder`."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        buffer = io.BytesIO()
        photo_like(rng).save(buffer, "JPEG", quality=int(rng.integers(85, 96)))
        path = folder / f"COCO_train2014_{index:012d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def rows_dataset(images: list[Path], count: int) -> datasets.Dataset:
    """`count` VQA rows in `vqa_data`'s contract, cycling through `images`."""
    questions, answers = common.questions_and_answers(count)
    return datasets.Dataset.from_dict(
        {
            "question_id": list(range(count)),
            "image_id": [index % len(images) for index in range(count)],
            "image": [str(images[index % len(images)]) for index in range(count)],
            "question": questions,
            "answers": [[answer] * 10 for answer in answers],
            "multiple_choice_answer": answers,
            "answer_type": ["other"] * count,
        },
        features=VQA_FEATURES,
    )


def loader(dataset: datasets.Dataset, collator: VqaCollator, batch_size: int, workers: int) -> DataLoader:
    """The DataLoader a training run builds over the rows."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collator)


def data_rate(dataset: datasets.Dataset, collator: VqaCollator, batch_size: int, workers: int) -> float:
    """Examples per second of one pass, after the first batch of every worker (worker start-up) is out."""
    batches = iter(loader(dataset, collator, batch_size, workers))
    for _ in range(max(1, workers)):
        next(batches)
    start, examples = time.perf_counter(), 0
    for batch in batches:
        examples += batch["input_ids"].shape[0]
    return examples / (time.perf_counter() - start)


def model_rate(settings: common.Settings, batch_size: int) -> float:
    """Examples per second of a training step (freeze none, AdamW) at `batch_size`."""
    model = common.build_model(settings).train()
    step = common.fused_step(settings, model, common.training_batch(settings, batch_size))
    times = common.time_interleaved({"step": step}, settings.device, settings.repeats, warmup=1)["step"]
    return batch_size / common.median(times)


class PeakReportingCollator:
    """Wraps a collator so that each batch also carries the RSS high-water mark (MiB) of the process that made it."""

    def __init__(self, collator: VqaCollator):
        self.collator = collator

    def __call__(self, rows: list[dict]) -> tuple[dict, int, float]:
        worker = torch.utils.data.get_worker_info()
        return self.collator(rows), worker.id if worker else -1, common.peak_memory_mib(torch.device("cpu"))


def peak_while_iterating(images: list[Path], count: int, batch_size: int, image_size: int, workers: int) -> dict:
    """Iterate `count` rows through the collator with `workers` DataLoader workers, in this process; the RSS
    high-water marks (MiB) of the main process and of the largest worker."""
    collator = PeakReportingCollator(VqaCollator(common.build_processor(image_size), "consensus", seed=0))
    seen, worker_peaks = 0, {}
    for batch, worker, peak in loader(rows_dataset(images, count), collator, batch_size, workers):
        seen += batch["input_ids"].shape[0]
        worker_peaks[worker] = max(peak, worker_peaks.get(worker, 0.0))
    main_peak = common.peak_memory_mib(torch.device("cpu"))
    return {"examples": seen, "main": main_peak, "worker": max(worker_peaks.values()) if workers else 0.0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="distinct JPEG files")
    parser.add_argument("--examples", type=int, default=256, help="examples per timed pass")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--memory-sizes", type=int, nargs=2, default=[2000, 20000], help="rows of the two datasets")
    parser.add_argument("--memory-workers", type=int, default=0, help="DataLoader workers of the memory runs")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = common.settings_from(args)
    if args.child:
        spec = json.loads(args.child)
        images = sorted(Path(spec["folder"]).glob("*.jpg"))
        image_size = settings.sizes.image_size
        peak = peak_while_iterating(images, spec["count"], spec["batch_size"], image_size, spec["workers"])
        print(json.dumps(peak))
        return
    if settings.quick:
        args.batch_size, args.images, args.examples, args.workers, args.memory_sizes = 2, 4, 8, [0, 1], [8, 16]
        args.memory_workers = 1

    report = common.Report(settings, "Data path: decode + processor + collate vs a training step")
    with tempfile.TemporaryDirectory() as folder:
        images = write_jpegs(Path(folder), args.images)
        kib = sorted(path.stat().st_size / 1024 for path in images)
        report.add(
            f"{len(images)} JPEGs 640x480, {kib[0]:.0f}-{kib[-1]:.0f} KiB (median {kib[len(kib) // 2]:.0f}); "
            f"{settings.sizes.image_size}-px pixel_values; batch {args.batch_size}; model {settings.config_name} "
            f"({args.dtype}, attn={settings.attn}, {settings.device}); medians of {settings.repeats}"
        )
        collator = VqaCollator(common.build_processor(settings.sizes.image_size), answer_strategy="consensus", seed=0)
        dataset = rows_dataset(images, args.examples)
        data = {}
        for workers in args.workers:
            rates = [data_rate(dataset, collator, args.batch_size, workers) for _ in range(settings.repeats)]
            data[workers] = common.median(rates)
        model = model_rate(settings, args.batch_size)
        report.table(
            ["workers", "data examples/s", "model train examples/s", "data / model"],
            [[str(workers), f"{rate:.1f}", f"{model:.1f}", f"{rate / model:.2f}"] for workers, rate in data.items()],
        )

        peaks = {}
        for count in args.memory_sizes:
            spec = {"folder": folder, "count": count, "batch_size": args.batch_size, "workers": args.memory_workers}
            child_arguments = [*common.forwarded_arguments(args), "--child", json.dumps(spec)]
            peaks[count] = common.run_child(Path(__file__), child_arguments)
        measured = ["main"] + (["worker"] if args.memory_workers else [])
        report.table(
            ["dataset rows", "examples iterated", *[f"{PROCESS_NAMES[key]} peak RSS MiB" for key in measured]],
            [
                [str(count), str(peak["examples"]), *[f"{peak[key]:.0f}" for key in measured]]
                for count, peak in peaks.items()
            ],
        )

    small, large = (peaks[count] for count in args.memory_sizes)
    growth = {key: large[key] / small[key] - 1 for key in measured}
    best = max(data, key=data.get)
    bottleneck = "not the bottleneck" if data[best] >= model else "DATA IS THE BOTTLENECK"
    peaks_text = ", ".join(
        f"{PROCESS_NAMES[key]} {large[key]:.0f} vs {small[key]:.0f} MiB ({growth[key]:+.1%})" for key in measured
    )
    within = max(map(abs, growth.values())) <= MEMORY_TOLERANCE
    report.finish(
        f"SUMMARY data [{settings.config_name}, {settings.device}, {args.dtype}, batch {args.batch_size}]: "
        f"{data[best]:.1f} examples/s with {best} workers vs model step {model:.1f} examples/s "
        f"(data/model {data[best] / model:.2f}: {bottleneck}); "
        f"peak RSS {args.memory_sizes[1]} vs {args.memory_sizes[0]} rows: {peaks_text} "
        f"(target within {MEMORY_TOLERANCE:.0%}: {'met' if within else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
