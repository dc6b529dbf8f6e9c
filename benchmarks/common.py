"""What the benchmark scripts share: the small and the book's full-size model built from configs with random
weights, a processor, synthetic questions, timing with warm-up and medians, peak memory, fresh subprocesses,
command-line flags and the hardware description printed beside every result."""

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from configuration_vqa_fusion import VqaFusionConfig  # noqa: E402
from modeling_vqa_fusion import VqaFusionForConditionalGeneration  # noqa: E402
from processing_vqa_fusion import VqaFusionProcessor  # noqa: E402
from tiny_components import TinySizes, build_tiny_components, part_configs  # noqa: E402

# Vocabularies of distilbert-base-uncased and gpt2, so that embedding and LM-head costs are the real ones.
QUESTION_VOCAB = 30522
DECODER_VOCAB = 50257
GPT2_EOS = 50256
# Writing "5" here resets this process's RSS high-water mark (Linux >= 4.0).
CLEAR_REFS = Path("/proc/self/clear_refs")

# hidden 256 / 4 heads / 4 layers in each part, ViT at 224 px with 16-px patches (196 patches + CLS).
SMALL = TinySizes(hidden=256, heads=4, question_layers=4, vision_layers=4, decoder_layers=4, image_size=224)
# The book's components: DistilBERT-base (768, 6 layers), ViT-B/16 at 224 px, GPT-2 124M (768, 12 layers).
FULL = TinySizes(
    hidden=768, heads=12, question_layers=6, vision_layers=12, decoder_layers=12, image_size=224,
    max_question_length=512, max_answer_positions=1024,
)

SUBJECTS = ["dog", "cat", "man", "woman", "car", "bus", "plate", "table", "tree", "sign", "train", "ball"]
TEMPLATES = [
    "What color is the {}?",
    "Is there a {} in the picture?",
    "How many {}s are there?",
    "What is the {} next to the window doing?",
    "Where is the {}?",
    "Is the {} on the left of the person holding the umbrella?",
]
ANSWERS = ["yes", "no", "2", "1", "white", "red", "on the table", "playing frisbee", "black and white", "3"]


@dataclass(frozen=True)
class Settings:
    """Where and how a benchmark runs, from the common command-line flags."""

    device: torch.device
    dtype: torch.dtype
    full: bool
    quick: bool
    attn: str
    repeats: int
    out: Path | None

    @property
    def sizes(self) -> TinySizes:
        return FULL if self.full else SMALL

    @property
    def config_name(self) -> str:
        return "full" if self.full else "small"


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The flags every script takes: device, dtype, model size, a one-iteration smoke mode and an output file."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bf16 autocast / weights")
    parser.add_argument("--full", action="store_true", help="the book's full-size components instead of the small ones")
    parser.add_argument("--quick", action="store_true", help="one tiny iteration of every path (smoke test)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repetitions; medians are reported")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 on CPU, where a second thread stalls on a shared machine; "
        "torch's default on CUDA)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also append the results to this file")


def settings_from(args: argparse.Namespace) -> Settings:
    """Apply `--threads` and turn the parsed common flags into `Settings`."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but CUDA is not available")
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    return Settings(
        device=device,
        dtype=getattr(torch, args.dtype),
        full=args.full,
        quick=args.quick,
        attn=args.attn,
        repeats=1 if args.quick else args.repeats,
        out=args.out,
    )


def build_config(sizes: TinySizes, fusion: str = "sequence", attn: str = "sdpa") -> VqaFusionConfig:
    """A vqa-fusion config of DistilBERT + ViT + GPT-2 at `sizes`, real vocabularies. With `prefix` fusion GPT-2
    gets 1,024 positions (as gpt2 has) to hold the question and image tokens before the answer."""
    if fusion == "prefix":
        sizes = dataclasses.replace(sizes, max_answer_positions=max(sizes.max_answer_positions, 1024))
    parts = part_configs(sizes, QUESTION_VOCAB, DECODER_VOCAB, question_pad_id=0, eos_id=GPT2_EOS)
    config = VqaFusionConfig(**parts, fusion=fusion)
    for part in (config.question_encoder, config.vision_encoder, config.decoder):
        part._attn_implementation = attn
    return config


def build_model(settings: Settings, fusion: str = "sequence", seed: int = 0) -> VqaFusionForConditionalGeneration:
    """A randomly initialised model at the settings' size, built directly on the settings' device (float32)."""
    torch.manual_seed(seed)
    with torch.device(settings.device):
        model = VqaFusionForConditionalGeneration(build_config(settings.sizes, fusion, settings.attn))
    return model


def questions_and_answers(count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`count` VQA-like questions of varied length and their answers, reproducibly."""
    rng = random.Random(seed)
    questions = [rng.choice(TEMPLATES).format(rng.choice(SUBJECTS)) for _ in range(count)]
    return questions, [rng.choice(ANSWERS) for _ in range(count)]


def build_processor(image_size: int, folder: str | Path | None = None) -> VqaFusionProcessor:
    """A processor whose image processor resizes to `image_size` and whose tokenizers are trained offline on
    the synthetic questions (WordPiece for questions, byte-level BPE for answers, as DistilBERT's and GPT-2's).
    Their ids fit the real vocabularies the models are built with."""
    questions, _ = questions_and_answers(500)
    sizes = TinySizes(hidden=32, heads=2, question_layers=1, vision_layers=1, decoder_layers=1, image_size=image_size)
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
        parts = build_tiny_components(folder, questions, ANSWERS, sizes)
        return VqaFusionProcessor.from_pretrained_components(**parts)


def random_images(count: int, size: tuple[int, int] = (640, 480), seed: int = 0) -> list:
    """`count` random RGB PIL images of `size` (width, height)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, size[1], size[0], 3), dtype=torch.uint8, generator=generator)
    return [Image.fromarray(image.numpy()) for image in pixels]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(function: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `function` takes, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(
    functions: dict[str, Callable[[], object]], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time several functions round-robin (after `warmup` untimed rounds), so that the machine's slow and fast
    moments hit all of them alike; returns every round's seconds per name."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(time_once(function, device))
    return times


def median(values: list[float]) -> float:
    """The median of a non-empty list."""
    return statistics.median(values)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA's allocator peak, or this process's RSS high-water mark (Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif CLEAR_REFS.exists():
        CLEAR_REFS.write_text("5")


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA's allocator peak on GPU, else this process's RSS high-water mark.

    On Linux the mark is `VmHWM`, which belongs to this process's own address space. `getrusage`'s `ru_maxrss`
    is not used there: it carries over through fork and exec, so a subprocess started by a big process would
    report its parent's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: Path, arguments: list[str]) -> dict:
    """Run `script` in a fresh Python process with `arguments` and return the JSON object it prints last."""
    result = subprocess.run(
        [sys.executable, str(script), *arguments], capture_output=True, text=True, check=False, cwd=ROOT
    )
    if result.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(arguments)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def forwarded_arguments(args: argparse.Namespace) -> list[str]:
    """The common flags of `args`, as a child process must receive them."""
    forwarded = ["--device", args.device, "--dtype", args.dtype, "--attn", args.attn, "--repeats", str(args.repeats)]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    return forwarded + [flag for flag, on in (("--full", args.full), ("--quick", args.quick)) if on]


def hardware() -> str:
    """CPU model, cores, GPU if any, torch version and threads: one line printed with every result."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"{cpu}, {cores} cores{gpu}; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
        f"load average {load} at start"
    )


def command_line() -> str:
    """How this script was run, to put beside its numbers."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return " ".join(["python", str(shown), *sys.argv[1:]])


class Report:
    """Prints result lines as they come and appends each at once to `--out`, so that a run cut short by a time
    limit still leaves what it measured."""

    def __init__(self, settings: Settings, title: str):
        self.out, self.quick = settings.out, settings.quick
        if self.out is not None:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        self.add(f"## {title}")
        self.add(f"command: {command_line()}")
        self.add(f"hardware: {hardware()}")
        self.add(f"date: {time.strftime('%Y-%m-%d %H:%M')}")

    def add(self, line: str) -> None:
        """Print `line` and append it to the output file, if one was given."""
        print(line, flush=True)
        if self.out is not None:
            with self.out.open("a") as handle:
                handle.write(line + "\n")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        """Add a markdown table: its header, then its rows (more may follow through `row`)."""
        self.row(header)
        self.row(["---"] * len(header))
        for cells in rows:
            self.row(cells)

    def row(self, cells: list[str]) -> None:
        """Add one markdown table row."""
        self.add("| " + " | ".join(cells) + " |")

    def finish(self, summary: str) -> None:
        """Add the one-line summary (marked when `--quick` made it a smoke test, not a measurement) and a blank line."""
        marked = summary.replace("SUMMARY", "SUMMARY (--quick smoke test, not a measurement)")
        self.add(marked if self.quick else summary)
        self.add("")


def training_batch(settings: Settings, batch_size: int) -> dict[str, torch.Tensor]:
    """A processor batch of `batch_size` questions, 640x480 images and answers, on the device."""
    processor = build_processor(settings.sizes.image_size)
    questions, answers = questions_and_answers(batch_size)
    encoded = processor(images=random_images(batch_size), text=questions, answers=answers, return_tensors="pt")
    return {name: value.to(settings.device) for name, value in encoded.items()}


def optimizer_step(
    settings: Settings, module: torch.nn.Module, loss: Callable[[], torch.Tensor]
) -> Callable[[], None]:
    """A function running one step of `loss` (under autocast when bf16) with a fresh AdamW over the trainable
    parameters of `module`."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        with autocast(settings):
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def fused_step(
    settings: Settings, model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> Callable[[], None]:
    """One step of the whole model, called as the Trainer calls it."""
    return optimizer_step(settings, model, lambda: model(**batch).loss)


@contextlib.contextmanager
def autocast(settings: Settings) -> Iterator[None]:
    """bf16 autocast when `--dtype bfloat16`, else nothing."""
    with torch.autocast(settings.device.type, dtype=settings.dtype, enabled=settings.dtype != torch.float32):
        yield
