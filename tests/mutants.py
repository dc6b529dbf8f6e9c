"""Planted defects that the test suite must catch.

Each `Mutant` is one small textual change to one file (`old` must occur exactly once) and the pytest node ids
that must catch it. The runner applies each mutant alone to a temporary copy of the repository, runs only its
tests there in a fresh process, restores the file, and calls the mutant killed when every one of its tests
failed (or errored in setup) and pytest ran them all (exit code 1: no collection error, no unknown node id).
A mutant survives otherwise. `tests/test_mutants.py` runs the list as part of the suite; from the repository
root, `python tests/mutants.py [NAME ...]` runs it (or the named mutants) on its own and prints a table.

Add a mutant whenever a bug is found that a test should have caught, with the test that now catches it.
Mutants whose tests are still being written carry `pending` (why they are not run yet): their text is
still checked on every run, so the list cannot rot.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What is never copied into the scratch repository: environments, outputs, caches.
NOT_COPIED = (".git", ".venv", "data", "outputs", "mutants", "__pycache__", ".pytest_cache", ".hypothesis", "*.pyc")
TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    pending: str | None = None


MUTANTS = [
    # Issue 12, point 1: a model blind to every image must not pass for one that learned from the images.
    Mutant(
        "blind-collator",
        "vqa_collator.py",
        '        images = [open_image(row["image"], question_id=row.get("question_id")) for row in rows]',
        '        images = [Image.new("RGB", open_image(row["image"]).size) for row in rows]',
        ("tests/test_train.py::test_flags_alone_train_a_model_that_reads_the_images",),
    ),
    # Issue 12, point 2: the reported accuracy must be the accuracy of predictions.json.
    Mutant(
        "metrics-against-reversed-answers",
        "train_hf.py",
        "        return vqa_accuracy(predictions, answers, answer_types)",
        "        return vqa_accuracy(predictions, [[answer[::-1] for answer in row] for row in answers], answer_types)",
        ("tests/test_train.py::test_outputs_are_complete_and_rescored_from_the_files",),
    ),
    # Issue 12, point 3: a resumed run must start from its checkpoint, not from scratch.
    Mutant(
        "resume-ignored",
        "train_hf.py",
        "    if value is None:\n        return None",
        "    if True:\n        return None",
        ("tests/test_train.py::test_resume_after_sigkill_continues_from_the_checkpoint",),
    ),
    # Issue 12, point 4: the decoder must not cross-attend to question padding.
    Mutant(
        "decoder-sees-question-padding",
        "modeling_vqa_fusion.py",
        "            encoder_attention_mask=encoder_outputs.attention_mask,",
        "            encoder_attention_mask=None,",
        (
            "tests/test_modeling.py::test_padded_rows_score_their_answers_as_they_do_alone[sequence-0]",
            "tests/test_modeling.py::test_padded_rows_score_their_answers_as_they_do_alone[sequence-1]",
            "tests/test_modeling.py::test_batched_generation_matches_one_by_one[sequence]",
            "tests/test_remote_code.py::test_saved_folder_loads_in_a_fresh_process_through_every_auto_class",
        ),
    ),
    # Issue 12, point 5: questions longer than the question encoder's positions.
    Mutant(
        "no-question-length-clamp",
        "processing_vqa_fusion.py",
        "        if positions is not None and question_tokenizer.model_max_length > positions:",
        "        if False:",
        ("tests/test_processing.py::test_long_questions_are_truncated_to_the_question_encoder_limit",),
    ),
    # Issue 12, point 6: the fusion layers' attention in-projection at initializer_range.
    Mutant(
        "fusion-attention-at-pytorch-init",
        "modeling_vqa_fusion.py",
        "        if isinstance(module, nn.MultiheadAttention):",
        "        if False:",
        ("tests/test_modeling.py::test_initializer_range_sets_the_std_of_the_new_weights_only",),
    ),
    # Issue 12, point 7: a scene generator biased towards squares lets the question text predict yes/no answers.
    Mutant(
        "shapes-squares-in-every-other-cell",
        "shapes_data.py",
        '        attributes = {"shape": rng.choice(SHAPES), "color": rng.choice(tuple(COLORS))}',
        '        attributes = {"shape": rng.choice(SHAPES) if cell % 2 else "square", "color": rng.choice(tuple(COLORS))}',
        ("tests/test_shapes_data.py::test_shapes_answers_are_not_predictable_from_question_text",),
    ),
    # Issue 12, point 8: the book's loss, -100, tiny images, non-ASCII questions, the Hub files' classes.
    Mutant(
        "vision-encoder-loaded-with-another-layer-norm",
        "backbones_vqa_fusion.py",
        "    config = AutoConfig.from_pretrained(name_or_path, **kwargs)",
        "    config = AutoConfig.from_pretrained(name_or_path, layer_norm_eps=0.1, **kwargs)",
        ("tests/test_modeling.py::test_mean_fusion_reproduces_the_books_loss",),
    ),
    Mutant(
        "mean-fusion-takes-cls-only",
        "fusion_vqa_fusion.py",
        "        fused = (question + self.image_projection(image_states.mean(1))) / 2",
        "        fused = (question + self.image_projection(image_states[:, 0])) / 2",
        ("tests/test_modeling.py::test_mean_fusion_reproduces_the_books_loss",),
    ),
    Mutant(
        "loss-scores-padding-as-token-0",
        "modeling_vqa_fusion.py",
        "            logits.float().flatten(0, 1), labels.flatten().to(logits.device),",
        "            logits.float().flatten(0, 1), labels.flatten().clamp(min=0).to(logits.device),",
        ("tests/test_modeling.py::test_labels_ignore_padding_and_keep_eos",),
    ),
    Mutant(
        "loss-averaged-over-padding-too",
        "modeling_vqa_fusion.py",
        "else (labels != -100).sum().clamp(min=1)",
        "else labels.numel()",
        ("tests/test_modeling.py::test_labels_ignore_padding_and_keep_eos",),
    ),
    Mutant(
        "images-not-resized",
        "processing_vqa_fusion.py",
        "self.image_processor(rgb_images, return_tensors=return_tensors)",
        "self.image_processor(rgb_images, return_tensors=return_tensors, do_resize=False)",
        ("tests/test_processing.py::test_every_image_mode_becomes_the_rgb_a_viewer_sees[1x1]",),
    ),
    Mutant(
        "questions-folded-to-ascii",
        "processing_vqa_fusion.py",
        "            questions,\n            padding=True,",
        '            [q.encode("ascii", "replace").decode() for q in questions],\n            padding=True,',
        ("tests/test_processing.py::test_non_ascii_questions_are_encoded_to_known_tokens",),
    ),
    Mutant(
        "processor-not-registered-for-auto-processor",
        "processing_vqa_fusion.py",
        "\nVqaFusionProcessor.register_for_auto_class()\n",
        "\n",
        ("tests/test_reliability.py::test_hub_files_do_nothing_at_import_but_define_classes",),
    ),
    # Issue 12, "also found": float input_ids, streaming sources with missing images.
    Mutant(
        "float-input-ids-accepted",
        "modeling_vqa_fusion.py",
        "        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:",
        "        if False:",
        ("tests/test_modeling.py::test_bad_inputs_raise_clear_errors[float_ids]",),
    ),
    Mutant(
        "streaming-images-unchecked",
        "vqa_data.py",
        '    return rows.filter(check, input_columns=["question_id", "image"])',
        "    return rows",
        (
            "tests/test_vqa_data.py::"
            "test_streaming_source_reports_a_missing_image_no_later_than_the_batch_that_needs_it",
        ),
    ),
    # The metric.
    Mutant(
        "metric-without-leave-one-out",
        "vqa_metric.py",
        "min(1.0, (total - held_out) / 3)",
        "min(1.0, total / 3)",
        ("tests/test_vqa_metric.py::test_accuracy_by_number_of_agreeing_annotators[3-90.0]",),
    ),
    Mutant(
        "metric-strips-every-period",
        "vqa_metric.py",
        '_PERIOD = re.compile(r"\\.(?!\\d)")',
        '_PERIOD = re.compile(r"\\.")',
        ("tests/test_vqa_metric.py::test_normalize_answer[2.5-2.5]",),
    ),
    Mutant(
        "metric-per-type-mixes-types",
        "vqa_metric.py",
        "zip(scores, answer_types) if t == answer_type])",
        "zip(scores, answer_types) if t is not None])",
        ("tests/test_vqa_metric.py::test_accuracy_per_answer_type",),
    ),
    # The processor's labels.
    Mutant(
        "answers-without-leading-space",
        "processing_vqa_fusion.py",
        'ids = self.tokenizer(self.answer_prefix + answer.strip(), add_special_tokens=False)["input_ids"]',
        'ids = self.tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]',
        ("tests/test_processing.py::test_labels_are_answer_tokens_then_eos_padded_with_minus_100",),
    ),
    Mutant(
        "labels-without-eos-when-truncated",
        "processing_vqa_fusion.py",
        "            rows.append(ids[: self.max_answer_length - 1] + [self.tokenizer.eos_token_id])",
        "            rows.append((ids + [self.tokenizer.eos_token_id])[: self.max_answer_length])",
        ("tests/test_processing.py::test_long_answers_are_truncated_but_keep_eos",),
    ),
    Mutant(
        "labels-padded-with-the-pad-id",
        "processing_vqa_fusion.py",
        "        return [row + [-100] * (width - len(row)) for row in rows]",
        "        return [row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows]",
        (
            "tests/test_processing.py::test_labels_are_answer_tokens_then_eos_padded_with_minus_100",
            "tests/test_modeling.py::test_padded_rows_score_their_answers_as_they_do_alone[sequence-0]",
        ),
    ),
    # The fusion masks.
    Mutant(
        "mean-over-question-padding",
        "fusion_vqa_fusion.py",
        "    weights = mask.unsqueeze(-1).to(states.dtype)",
        "    weights = torch.ones_like(mask).unsqueeze(-1).to(states.dtype)",
        (
            "tests/test_modeling.py::test_mean_fusion_ignores_question_padding",
            "tests/test_modeling.py::test_padded_rows_score_their_answers_as_they_do_alone[mean-0]",
        ),
    ),
    Mutant(
        "fusion-layers-read-question-padding",
        "fusion_vqa_fusion.py",
        "            memory = layer(memory, src_key_padding_mask=mask == 0)",
        "            memory = layer(memory)",
        (
            "tests/test_modeling.py::test_sequence_fusion_layers_ignore_question_padding",
            "tests/test_modeling.py::test_padded_rows_score_their_answers_as_they_do_alone[sequence-1]",
        ),
    ),
    Mutant(
        "image-patches-masked-out",
        "fusion_vqa_fusion.py",
        "        mask = torch.cat([question_mask, question_mask.new_ones(image_states.shape[:2])], dim=1)",
        "        mask = torch.cat([question_mask, question_mask.new_zeros(image_states.shape[:2])], dim=1)",
        ("tests/test_modeling.py::test_sequence_fusion_layers_ignore_question_padding",),
    ),
    # A resume must restore every trained weight, the ViT's (saved under its original names by default) too.
    Mutant(
        "checkpoints-in-original-format",
        "train_hf.py",
        "functools.partial(self.model.save_pretrained, save_original_format=False)",
        "functools.partial(self.model.save_pretrained, save_original_format=True)",
        ("tests/test_lora.py::test_train_hf_lora_run_trains_saves_merged_and_resumes_from_its_checkpoint",),
    ),
    # The collator.
    Mutant(
        "sample-always-the-first-answer",
        "vqa_collator.py",
        "        return answers[rng.randrange(len(answers))]",
        "        return answers[0]",
        ("tests/test_vqa_collator.py::test_collator_sample_draws_proportionally_to_annotators",),
    ),
    Mutant(
        "consensus-from-the-first-human-answer",
        "vqa_collator.py",
        '        answer = row.get("multiple_choice_answer")',
        '        answer = (row.get("answers") or [None])[0]',
        ("tests/test_vqa_collator.py::test_collator_consensus_uses_multiple_choice_answer",),
    ),
    Mutant(
        "images-decoded-lazily",
        "vqa_collator.py",
        "        decoded = Image.open(io.BytesIO(data))\n        decoded.load()",
        "        decoded = Image.open(io.BytesIO(data))",
        ("tests/test_vqa_collator.py::test_collator_names_path_and_question_id_of_unreadable_images[truncated-jpeg]",),
    ),
    Mutant(
        "no-decoder-inputs-for-smoothed-labels",
        "vqa_collator.py",
        '        if "labels" in batch and hasattr(self.model, "prepare_decoder_input_ids_from_labels"):',
        "        if False:",
        ("tests/test_vqa_collator.py::test_collator_gives_the_decoder_inputs_the_model_would_build",),
    ),
    # Where the data comes from.
    Mutant(
        "test-dev-images-looked-up-as-test-dev",
        "vqa_data.py",
        '    return re.sub(r"^test-dev", "test", data_subtype)',
        "    return data_subtype",
        ("tests/test_vqa_data.py::test_test_dev_questions_find_their_images_among_the_test2015_ones",),
    ),
    Mutant(
        "a-single-answer-counted-as-one-annotator",
        "vqa_data.py",
        "[[answer] * ANNOTATORS if answer else []",
        "[[answer] if answer else []",
        ("tests/test_vqa_data.py::test_a_source_with_only_image_question_and_answer_gets_the_rest_derived[False]",),
    ),
    Mutant(
        "recipe-data-kept-over-the-command-line",
        "train_hf.py",
        "        recipe = {name: value for name, value in recipe.items() if name not in DATA_SOURCE_ARGUMENTS}\n",
        "",
        ("tests/test_train.py::test_data_on_the_command_line_replaces_the_recipes",),
    ),
    # Run modes.
    Mutant(
        "model-saved-after-evaluation",
        "train_hf.py",
        '        trainer.save_model()\n        trainer.save_metrics("train", train_result.metrics)',
        '        trainer.save_metrics("train", train_result.metrics)',
        ("tests/test_train.py::test_the_trained_model_is_saved_before_evaluation",),
    ),
    Mutant(
        "a-saved-max-new-tokens-beats-the-users-length",
        "train_hf.py",
        "        model.generation_config.max_new_tokens = None\n",
        "",
        ("tests/test_train.py::test_generation_settings_are_the_users",),
    ),
    # The multi-process evaluation: the sampler's repeated questions kept (Seq2SeqTrainer's `gather`).
    Mutant(
        "two-processes-keep-the-repeated-questions",
        "train_hf.py",
        "        self.gather_function = self.accelerator.gather_for_metrics\n",
        "",
        ("tests/test_train.py::test_two_processes_train_and_evaluate_as_one_job[torchrun]",),
    ),
]


@dataclass
class Outcome:
    mutant: Mutant
    killed: bool
    why: str
    seconds: float
    output: str = ""


def mutated(mutant: Mutant, root: Path = ROOT) -> tuple[str, str]:
    """`(original, mutated)` text of the mutant's file under `root`; a `ValueError` when `old` does not occur
    exactly once (the list has rotted: the code changed under it)."""
    original = (root / mutant.file).read_text(encoding="utf-8")
    count = original.count(mutant.old)
    if count != 1:
        raise ValueError(f"mutant {mutant.name}: its text occurs {count} times in {mutant.file}, not once: {mutant.old!r}")
    return original, original.replace(mutant.old, mutant.new)


def scratch_copy(destination: Path) -> Path:
    """The repository's sources, tests and configs copied to `destination`."""
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(*NOT_COPIED))
    return destination


def run_mutant(mutant: Mutant, copy: Path) -> Outcome:
    """Apply `mutant` in `copy`, run its tests in a fresh process (one thread: a small job on a shared CPU),
    restore the file."""
    start = time.monotonic()
    path = copy / mutant.file
    original, text = mutated(mutant, copy)
    path.write_text(text, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *mutant.tests]
    try:
        completed = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Outcome(mutant, False, f"its tests ran past {TIMEOUT_S} s", time.monotonic() - start)
    finally:
        path.write_text(original, encoding="utf-8")
    output = completed.stdout + completed.stderr
    caught = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", completed.stdout, flags=re.MULTILINE))
    passed = [test for test in mutant.tests if test not in caught]
    if completed.returncode != 1:
        why = f"pytest exited with {completed.returncode} (1 is: tests ran and some failed)"
    elif passed:
        why = f"these tests passed with the defect: {passed}"
    else:
        why = "every test failed"
    return Outcome(mutant, completed.returncode == 1 and not passed, why, time.monotonic() - start, output)


def run_mutants(mutants: list[Mutant], workers: int = 2) -> dict[str, Outcome]:
    """Run `mutants` on `workers` scratch copies side by side; `{name: Outcome}`."""
    for mutant in mutants:
        mutated(mutant)
    with tempfile.TemporaryDirectory(prefix="vqa-fusion-mutants-") as folder:
        copies: queue.Queue[Path] = queue.Queue()
        for index in range(max(1, min(workers, len(mutants)))):
            copies.put(scratch_copy(Path(folder) / f"copy{index}"))

        def run(mutant: Mutant) -> Outcome:
            copy = copies.get()
            try:
                return run_mutant(mutant, copy)
            finally:
                copies.put(copy)

        with ThreadPoolExecutor(max_workers=copies.qsize()) as pool:
            return {outcome.mutant.name: outcome for outcome in pool.map(run, mutants)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: every one not pending)")
    parser.add_argument("--pending", action="store_true", help="also run the pending mutants")
    parser.add_argument("--workers", type=int, default=2, help="mutants run side by side (default 2)")
    args = parser.parse_args(argv)
    unknown = set(args.names) - {mutant.name for mutant in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}")
    if args.names:
        chosen = [mutant for mutant in MUTANTS if mutant.name in args.names]
    else:
        chosen = [mutant for mutant in MUTANTS if args.pending or mutant.pending is None]
    start = time.monotonic()
    outcomes = run_mutants(chosen, args.workers)
    for outcome in outcomes.values():
        status = "killed" if outcome.killed else "SURVIVED"
        print(f"{status:8}  {outcome.seconds:5.1f} s  {outcome.mutant.name}: {outcome.why}")
    survivors = [outcome for outcome in outcomes.values() if not outcome.killed]
    print(f"{len(outcomes) - len(survivors)} of {len(outcomes)} mutants killed in {time.monotonic() - start:.0f} s")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
