"""Answers per second: batched `model.generate` with the KV cache against the book's inference loop.

The book answers one question at a time with a greedy Python loop and no cache: at every new token it runs the
whole model (question encoder, vision encoder, fusion and decoder) on the question, the image and the answer
prefix, and takes the argmax of the last logits, stopping at EOS or after `max_new_tokens`. Both methods run on
the same model with the same weights and the same questions and images, and must produce the same answers.

With random weights EOS could be the argmax early and cut answers short, so both methods forbid EOS until
`max_new_tokens` tokens exist (`min_new_tokens=max_new_tokens` in `generate`, and the same -inf on the EOS
logit in the book's loop): every answer has the full length and the token counts are identical.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from modeling_vqa_fusion import VqaFusionForConditionalGeneration  # noqa: E402

TARGET_RATIO = 10.0


def book_generate(
    model: VqaFusionForConditionalGeneration, inputs: dict[str, torch.Tensor], max_new_tokens: int, min_new_tokens: int
) -> list[int]:
    """The book's loop for one question: greedy, no cache, the full model re-run on the whole prefix each step.
    Returns the generated ids (EOS included if it came)."""
    config = model.config
    prefix = torch.tensor([[config.decoder_start_token_id]], device=inputs["input_ids"].device)
    for step in range(max_new_tokens):
        logits = model(**inputs, decoder_input_ids=prefix, use_cache=False).logits[0, -1]
        if step < min_new_tokens:
            logits[config.eos_token_id] = float("-inf")
        token = logits.argmax()
        prefix = torch.cat([prefix, token.view(1, 1)], dim=1)
        if token.item() == config.eos_token_id:
            break
    return prefix[0, 1:].tolist()


def cached_generate(
    model: VqaFusionForConditionalGeneration, batch: dict[str, torch.Tensor], max_new_tokens: int, min_new_tokens: int
) -> list[list[int]]:
    """vqa-fusion's way: one batched greedy `generate` with the KV cache. Returns each row's generated ids up to
    and including its first EOS."""
    sequences = model.generate(
        **batch, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False, num_beams=1
    )
    eos = model.config.eos_token_id
    answers = []
    for row in sequences[:, 1:].tolist():
        answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


def prepare_inputs(
    settings: common.Settings, count: int
) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The processor's inputs for `count` questions and 640x480 images: one unpadded input per question (the book
    prepares one question at a time) and the padded batch of all of them."""
    processor = common.build_processor(settings.sizes.image_size)
    questions, _ = common.questions_and_answers(count)
    images = common.random_images(count)

    def encode(index: slice) -> dict[str, torch.Tensor]:
        encoded = processor(images=images[index], text=questions[index], return_tensors="pt")
        return {name: value.to(settings.device) for name, value in encoded.items()}

    return [encode(slice(i, i + 1)) for i in range(count)], encode(slice(0, count))


def with_dtype(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`inputs` with their floating point tensors (the pixels) cast to `dtype`, as the model's weights are."""
    return {name: value.to(dtype) if value.is_floating_point() else value for name, value in inputs.items()}


def slice_batch(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """The first `size` rows of a padded batch, trimmed of columns that are padding in all of them."""
    rows = {name: value[:size] for name, value in batch.items()}
    width = int(rows["attention_mask"].sum(1).max())
    rows["input_ids"], rows["attention_mask"] = rows["input_ids"][:, :width], rows["attention_mask"][:, :width]
    return rows


def run_both(
    model: VqaFusionForConditionalGeneration,
    singles: list[dict[str, torch.Tensor]],
    batch: dict[str, torch.Tensor],
    new_tokens: int,
) -> tuple[list[list[int]], list[list[int]]]:
    """Answers of both methods for the questions of `batch`."""
    ours = cached_generate(model, batch, new_tokens, new_tokens)
    book = [book_generate(model, inputs, new_tokens, new_tokens) for inputs in singles[: len(ours)]]
    return ours, book


def check_identical(ours: list[list[int]], book: list[list[int]], new_tokens: int) -> None:
    """Both methods gave the same answers, each of the full forced length."""
    mismatches = [index for index, (a, b) in enumerate(zip(ours, book, strict=True)) if a != b]
    assert not mismatches, f"answers differ for questions {mismatches}"
    assert all(len(answer) == new_tokens for answer in ours), "an answer stopped before max_new_tokens"


def time_both(
    settings: common.Settings,
    model: VqaFusionForConditionalGeneration,
    singles: list[dict[str, torch.Tensor]],
    batch: dict[str, torch.Tensor],
    new_tokens: int,
) -> tuple[dict[str, list[float]], list[list[int]], list[list[int]]]:
    """Seconds of each method over the questions of `batch`, round-robin, and the answers of the last round."""
    answers: dict[str, list[list[int]]] = {}

    def ours() -> None:
        answers["ours"] = cached_generate(model, batch, new_tokens, new_tokens)

    def book() -> None:
        questions = singles[: len(batch["input_ids"])]
        answers["book"] = [book_generate(model, one, new_tokens, new_tokens) for one in questions]

    times = common.time_interleaved({"ours": ours, "book": book}, settings.device, settings.repeats, warmup=0)
    return times, answers["ours"], answers["book"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser, repeats=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--fusion", default="sequence", choices=["sequence", "mean", "prefix"])
    args = parser.parse_args(argv)
    settings = common.settings_from(args)
    batch_sizes, token_counts = ([1, 2], [2]) if settings.quick else (args.batch_sizes, args.new_tokens)

    report = common.Report(settings, "Generation: batched generate + KV cache vs the book's loop")
    model = common.build_model(settings, fusion=args.fusion).eval()
    singles, batch = prepare_inputs(settings, max(batch_sizes))
    report.add(
        f"model: {settings.config_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"fusion={args.fusion}, attn={settings.attn}, {args.dtype}, {settings.device}); "
        f"{settings.sizes.image_size}-px images, patch {settings.sizes.patch_size}; EOS suppressed in both methods"
    )
    if settings.dtype != torch.float32:
        # Batched and single-question bf16 matmuls round differently, so exact identity is checked in float32
        # on the largest configuration, then both methods are timed with bf16 weights.
        with torch.inference_mode():
            largest = slice_batch(batch, max(batch_sizes))
            check_identical(*run_both(model, singles, largest, max(token_counts)), max(token_counts))
        report.add("float32 check: identical answers on the largest configuration")
        model.to(settings.dtype)
        singles, batch = [with_dtype(one, settings.dtype) for one in singles], with_dtype(batch, settings.dtype)

    report.table(["batch", "new tokens", "ours answers/s", "book answers/s", "ratio", "identical answers"], [])
    results = {}
    with torch.inference_mode():
        run_both(model, singles, slice_batch(batch, 1), 2)  # warm-up
        for new_tokens in token_counts:
            for size in batch_sizes:
                inputs = slice_batch(batch, size)
                times, ours_answers, book_answers = time_both(settings, model, singles, inputs, new_tokens)
                agreement = sum(a == b for a, b in zip(ours_answers, book_answers)) / size
                if settings.dtype == torch.float32:
                    check_identical(ours_answers, book_answers, new_tokens)
                ours, book = size / common.median(times["ours"]), size / common.median(times["book"])
                results[(size, new_tokens)] = ours / book
                cells = [f"{ours:.1f}", f"{book:.2f}", f"{ours / book:.1f}x", f"{agreement:.0%}"]
                report.row([str(size), str(new_tokens), *cells])

    size, new_tokens = max(batch_sizes), max(token_counts)
    ratio = results[(size, new_tokens)]
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    report.finish(
        f"SUMMARY generation [{settings.config_name}, {settings.device}, {args.dtype}]: batch {size} x {new_tokens} "
        f"new tokens: {ratio:.1f}x the book's answers/s (target >= {TARGET_RATIO:.0f}x: {verdict}); "
        f"answers identical: {'asserted' if settings.dtype == torch.float32 else 'asserted in float32'}"
    )


if __name__ == "__main__":
    main()
