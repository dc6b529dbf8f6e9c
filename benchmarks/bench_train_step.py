"""One optimizer step (forward, backward, AdamW update): the fused model against the sum of its parts, and the
step's time and peak memory for each freeze setting, activation checkpointing, torch.compile and bf16 autocast.

The fusion's own cost is `fused step - (question encoder step + vision encoder step + decoder step)`, each part
run alone on the same shapes with its own AdamW: the question encoder on the questions, the vision encoder on
the images, the decoder on the answers with a random cross-attention memory as long as the fused one
(question tokens + image patches) that requires a gradient, as the fused memory does. The four steps are timed
round-robin in one process and the cost is the median over rounds.

Every row of the variant table runs in a fresh subprocess: on CPU its peak is the process's RSS high-water mark
(`VmHWM`), on CUDA `torch.cuda.max_memory_allocated`.
"""

import argparse
import dataclasses
import json
import resource
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from modeling_vqa_fusion import VqaFusionForConditionalGeneration  # noqa: E402

TARGET_FUSION_SHARE = 5.0
PARTS = ("question encoder", "vision encoder", "decoder")
FUSION_MODULE = "fusion module"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the step table."""

    freeze: str = "none"
    checkpointing: bool = False
    compile: bool = False
    dtype: str | None = None

    @property
    def label(self) -> str:
        flags = (("activation checkpointing", self.checkpointing), ("torch.compile", self.compile))
        extras = [name for name, on in flags if on] + ([self.dtype] if self.dtype else [])
        return f"freeze={self.freeze}" + "".join(f", {extra}" for extra in extras)


def part_steps(
    settings: common.Settings, model: VqaFusionForConditionalGeneration, batch: dict[str, torch.Tensor]
) -> dict[str, Callable[[], None]]:
    """One step of each part alone on the fused model's shapes, and one of the fusion module alone on the
    encoders' output shapes. The encoders' stand-in loss (mean square of the states) sends them a dense gradient,
    as the fusion does."""
    encoder, decoder = model.encoder, model.decoder
    question_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        question_states = encoder.question_encoder(**question_inputs).last_hidden_state
        image_states = encoder.vision_encoder(pixel_values=batch["pixel_values"]).last_hidden_state
        fused = encoder.fusion(question_states, batch["attention_mask"], image_states)
        memory, memory_mask = fused[0], fused[1]
    question_states, image_states, memory = (
        torch.randn_like(states).requires_grad_(True) for states in (question_states, image_states, memory)
    )
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(batch["labels"])

    def question_loss() -> torch.Tensor:
        return encoder.question_encoder(**question_inputs).last_hidden_state.float().square().mean()

    def vision_loss() -> torch.Tensor:
        return encoder.vision_encoder(pixel_values=batch["pixel_values"]).last_hidden_state.float().square().mean()

    def decoder_loss() -> torch.Tensor:
        logits = decoder(
            input_ids=decoder_input_ids, encoder_hidden_states=memory, encoder_attention_mask=memory_mask
        ).logits
        return model.answer_loss(logits, batch["labels"])

    def fusion_loss() -> torch.Tensor:
        return encoder.fusion(question_states, batch["attention_mask"], image_states)[0].float().square().mean()

    return {
        "question encoder": common.optimizer_step(settings, encoder.question_encoder, question_loss),
        "vision encoder": common.optimizer_step(settings, encoder.vision_encoder, vision_loss),
        "decoder": common.optimizer_step(settings, decoder, decoder_loss),
        FUSION_MODULE: common.optimizer_step(settings, encoder.fusion, fusion_loss),
    }


def count_page_faults(function: Callable[[], None], counts: list[int]) -> Callable[[], None]:
    """`function`, appending the minor page faults of each call to `counts` (memory the OS had to map afresh)."""

    def counted() -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        function()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    return counted


def measure_fusion_cost(settings: common.Settings, batch_size: int) -> dict:
    """Median seconds and page faults of the fused step and of each part's step, timed round-robin, and the
    median over rounds of the fusion's cost (fused - sum of the three parts) as a share of the fused step."""
    model = common.build_model(settings).train()
    batch = common.training_batch(settings, batch_size)
    functions = {"fused": common.fused_step(settings, model, batch), **part_steps(settings, model, batch)}
    faults: dict[str, list[int]] = {name: [] for name in functions}
    counted = {name: count_page_faults(function, faults[name]) for name, function in functions.items()}
    times = common.time_interleaved(counted, settings.device, settings.repeats, warmup=1)
    costs = [fused - sum(times[name][i] for name in PARTS) for i, fused in enumerate(times["fused"])]
    return {
        "seconds": {name: common.median(values) for name, values in times.items()},
        "faults": {name: common.median(values) for name, values in faults.items()},
        "cost": common.median(costs),
        "share": 100 * common.median([cost / fused for cost, fused in zip(costs, times["fused"])]),
    }


def measure_variant(settings: common.Settings, variant: Variant, batch_size: int) -> dict:
    """Step time and peak memory of one variant; meant to run alone in a fresh process."""
    if variant.dtype:
        settings = dataclasses.replace(settings, dtype=getattr(torch, variant.dtype))
    model = common.build_model(settings).train()
    model.freeze(variant.freeze)
    if variant.checkpointing:
        model.activation_checkpointing_enable()
    runnable = torch.compile(model) if variant.compile else model
    batch = common.training_batch(settings, batch_size)
    step = common.fused_step(settings, runnable, batch)
    common.reset_peak_memory(settings.device)
    before = common.peak_memory_mib(settings.device)
    first = common.time_once(step, settings.device)
    times = common.time_interleaved({"step": step}, settings.device, settings.repeats, warmup=1)["step"]
    return {
        "step": common.median(times),
        "first": first,
        "peak": common.peak_memory_mib(settings.device),
        "before": before,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def variants(settings: common.Settings, with_compile: bool) -> list[Variant]:
    """The rows of the step table: the freeze settings, checkpointing, float32 for comparison when the run is in
    bf16, and last (the slowest to start) optionally torch.compile."""
    rows = [Variant("none"), Variant("encoders"), Variant("decoder"), Variant("none", checkpointing=True)]
    if settings.dtype != torch.float32:
        rows.append(Variant("none", dtype="float32"))
    if with_compile:
        rows.append(Variant("none", compile=True))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=3)
    parser.add_argument("--batch-size", type=int, default=32, help="the book's per-device batch (32)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds of the fused-vs-parts timing")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (slow to compile on CPU)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = common.settings_from(args)
    batch_size = 2 if settings.quick else args.batch_size
    if args.child:
        print(json.dumps(measure_variant(settings, Variant(**json.loads(args.child)), batch_size)))
        return

    report = common.Report(settings, "Train step: fused model vs its parts; freeze, checkpointing, compile")
    rounds = 1 if settings.quick else args.rounds
    report.add(
        f"model: {settings.config_name}, batch {batch_size}, {args.dtype}, attn={settings.attn}, {settings.device}; "
        f"{settings.sizes.image_size}-px images, patch {settings.sizes.patch_size}; AdamW; medians of {rounds} "
        f"rounds (fused vs parts) and {settings.repeats} steps (variants)"
    )
    cost = measure_fusion_cost(dataclasses.replace(settings, repeats=rounds), batch_size)
    seconds, faults, share = cost["seconds"], cost["faults"], cost["share"]
    fusion_share = 100 * seconds[FUSION_MODULE] / seconds["fused"]
    columns = ["fused", *PARTS]
    report.table(
        ["", *[f"{name} step" for name in columns], "sum of parts", "fusion cost (fused - sum)", "fusion module alone"],
        [
            [
                "seconds",
                *[f"{seconds[name]:.3f}" for name in columns],
                f"{sum(seconds[name] for name in PARTS):.3f}",
                f"{cost['cost']:+.3f} ({share:+.1f} %)",
                f"{seconds[FUSION_MODULE]:.3f} ({fusion_share:.1f} %)",
            ],
            [
                "minor page faults",
                *[f"{faults[name]:.0f}" for name in columns],
                f"{sum(faults[name] for name in PARTS):.0f}",
                f"{faults['fused'] - sum(faults[name] for name in PARTS):+.0f}",
                f"{faults[FUSION_MODULE]:.0f}",
            ],
        ],
    )

    memory = "CUDA max allocated" if settings.device.type == "cuda" else "RSS high-water mark"
    header = ["variant", "trainable", "step s (median)", "examples/s", "first step s", f"peak MiB ({memory})"]
    report.table([*header, "peak above built model MiB"], [])
    results = {}
    for variant in variants(settings, args.compile):
        child_arguments = ["--batch-size", str(batch_size), "--child", json.dumps(dataclasses.asdict(variant))]
        result = common.run_child(Path(__file__), [*common.forwarded_arguments(args), *child_arguments])
        results[variant] = result
        report.row(
            [
                variant.label,
                f"{result['trainable'] / 1e6:.1f}M",
                f"{result['step']:.3f}",
                f"{batch_size / result['step']:.1f}",
                f"{result['first']:.1f}",
                f"{result['peak']:.0f}",
                f"{result['peak'] - result['before']:.0f}",
            ]
        )

    none, encoders = results[Variant("none")], results[Variant("encoders")]
    cuts = encoders["step"] < none["step"] and encoders["peak"] < none["peak"]
    report.finish(
        f"SUMMARY train step [{settings.config_name}, {settings.device}, {args.dtype}, batch {batch_size}]: "
        f"fusion cost {share:+.1f} % of the step (target < {TARGET_FUSION_SHARE:.0f} %: "
        f"{'met' if share < TARGET_FUSION_SHARE else 'NOT met'}; the fusion module alone {fusion_share:.1f} %); "
        f"freeze=encoders "
        f"{none['step'] / encoders['step']:.2f}x faster, peak {encoders['peak']:.0f} vs {none['peak']:.0f} MiB "
        f"(cuts both: {'yes' if cuts else 'NO'})"
    )


if __name__ == "__main__":
    main()
