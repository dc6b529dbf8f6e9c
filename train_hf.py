"""Fine-tune, evaluate and predict with vqa-fusion and `Seq2SeqTrainer`.

    accelerate launch train_hf.py                        # the offline demo (configs/demo.yaml)
    accelerate launch train_hf.py configs/vqav2.yaml     # a recipe file
    accelerate launch train_hf.py configs/vqav2.yaml --learning_rate 1e-4   # flags override the file
    python train_hf.py --preset tiny --train_questions q.json --train_annotations a.json --train_images imgs \\
        --eval_questions ... --eval_annotations ... --eval_images ... --output_dir out     # flags alone
    python train_hf.py --model_name_or_path out --eval_questions ... --eval_images ... --output_dir preds

Training runs when training data is given and evaluation when evaluation data is given (`--do_train` /
`--do_eval` say otherwise); `--model_name_or_path M --do_train false` evaluates or predicts with M and
writes nothing into M. Under `torchrun` or `accelerate launch --multi_gpu` the processes form one job (on a
machine without CUDA through the gloo backend). Writes to `--output_dir`: the model and processor with
their remote code (before any evaluation), `eval_results.json` when the evaluation data is labelled,
`predictions.json` (the official results format) and, after training, `training_curves.png` and a model card
(`README.md`).
"""

import argparse
import functools
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
import yaml
from transformers import HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lora import ALL_LINEAR, LORA_PARTS, add_lora, check_checkpoint_adapters, describe_trainable, merge_lora
from model_card import CURVES_NAME, plot_training_curves, render_model_card
from modeling_vqa_fusion import FREEZE_SPECS, VqaFusionForConditionalGeneration
from processing_vqa_fusion import VqaFusionProcessor
from shapes_data import make_shapes_vqa
from tiny_components import DECODERS, QUESTION_ENCODERS, VISION_ENCODERS, TinySizes, build_tiny_components
from vqa_collator import VqaCollator
from vqa_data import VqaDataError, load_vqa_dataset, load_vqa_files
from vqa_metric import vqa_accuracy

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
ANSWER_STRATEGIES = ("consensus", "sample")
SPLIT_FILES = ("questions", "annotations", "images")
# The arguments that say where the data comes from. When the command line names any of them, the recipe
# file's are all dropped: the user's data always wins over the recipe's.
DATA_SOURCE_ARGUMENTS = (
    "synthetic_data_dir",
    "dataset_name",
    *(f"{split}_{kind}" for split in ("train", "eval") for kind in SPLIT_FILES),
)
# This script's defaults where transformers' do not fit: generation-based evaluation, the raw columns kept
# for the collator, and do_train/do_eval decided by the data given (`None` until then).
SCRIPT_DEFAULTS = {"predict_with_generate": True, "remove_unused_columns": False, "do_train": None, "do_eval": None}
# Where the tiny preset's components are built, inside --output_dir: `Trainer.push_to_hub` uploads the folder
# without the names that start with "_" (they are in the saved model and processor anyway).
TINY_COMPONENTS = "_tiny_components"
# Positions of the tiny GPT-2 with prefix fusion: the question (32 tokens at most), the image tokens (16 to 21 on
# the tiny backbones' 4 x 4 grid) and the answer.
PREFIX_POSITIONS = 128


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A saved vqa-fusion model (folder or hub id): trained further, or with --do_train false evaluated."
        },
    )
    question_encoder: str = field(default="distilbert-base-uncased", metadata={"help": "Question encoder id/folder."})
    vision_encoder: str = field(
        default="google/vit-base-patch16-224-in21k", metadata={"help": "Vision encoder id/folder."}
    )
    decoder: str = field(default="gpt2", metadata={"help": "Decoder id/folder (a causal LM with cross-attention)."})
    preset: str | None = field(
        default=None,
        metadata={"help": "'tiny': small random components and tokenizers trained on the training text (offline)."},
    )
    tiny_question_encoder: str = field(
        default="distilbert", metadata={"help": f"--preset tiny: the question encoder, one of {QUESTION_ENCODERS}."}
    )
    tiny_vision_encoder: str = field(
        default="vit", metadata={"help": f"--preset tiny: the vision encoder, one of {VISION_ENCODERS}."}
    )
    tiny_decoder: str = field(default="gpt2", metadata={"help": f"--preset tiny: the decoder, one of {DECODERS}."})
    fusion: str = field(
        default="sequence",
        metadata={"help": "'sequence', 'mean' (the book's) or 'prefix' (for decoder-only LMs such as Llama, Qwen2)."},
    )
    fusion_layers: int = field(
        default=0,
        metadata={"help": "Sequence or prefix fusion: transformer layers over the joint question + image tokens."},
    )
    initializer_range: float | None = field(
        default=None,
        metadata={"help": "Std of the weights vqa-fusion adds (fusion, cross-attention); default: the decoder's own."},
    )
    freeze: str = field(default="none", metadata={"help": f"Comma list of {', '.join(FREEZE_SPECS)}."})
    max_answer_length: int = field(default=16, metadata={"help": "Answer tokens kept in the labels, EOS included."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank for the pretrained parts in --lora_parts; 0: no LoRA."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha: the adapters' updates scale by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA adapters' input."})
    lora_target_modules: str = field(
        default=ALL_LINEAR,
        metadata={"help": "'all-linear' (every linear layer but the output layer) or a comma list of layer names."},
    )
    lora_parts: str = field(
        default="decoder", metadata={"help": f"Parts with LoRA adapters: a comma list of {', '.join(LORA_PARTS)}."}
    )


def _column(target: str) -> dict:
    return field(default=None, metadata={"help": f"Source column for {target!r} (default: {target!r} if present)."})


@dataclass
class DataArguments:
    synthetic_data_dir: str | None = field(
        default=None, metadata={"help": "Make the offline shapes dataset here (if absent) and train on it."}
    )
    synthetic_train_images: int = field(default=4000, metadata={"help": "Shapes dataset: training images."})
    synthetic_eval_images: int = field(default=300, metadata={"help": "Shapes dataset: held-out images."})
    synthetic_jitter: bool = field(
        default=False, metadata={"help": "Shapes dataset: vary each object's size and position within its cell."}
    )
    train_questions: str | None = field(default=None, metadata={"help": "Official VQA v2 questions JSON."})
    train_annotations: str | None = field(default=None, metadata={"help": "Official VQA v2 annotations JSON."})
    train_images: str | None = field(default=None, metadata={"help": "Folder of the training images."})
    eval_questions: str | None = field(default=None, metadata={"help": "Questions JSON (val, test-dev or test)."})
    eval_annotations: str | None = field(
        default=None, metadata={"help": "Annotations JSON; none for test-dev/test: predictions only, no metric."}
    )
    eval_images: str | None = field(default=None, metadata={"help": "Folder of the images (test-dev: test2015)."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` source: hub id, local data files folder or save_to_disk folder."}
    )
    train_split: str = field(default="train")
    eval_split: str = field(default="validation")
    images_dir: str | None = field(default=None, metadata={"help": "Base folder for relative image paths."})
    image_column: str | None = _column("image")
    question_column: str | None = _column("question")
    answers_column: str | None = _column("answers")
    answer_column: str | None = _column("multiple_choice_answer")
    question_id_column: str | None = _column("question_id")
    image_id_column: str | None = _column("image_id")
    answer_type_column: str | None = _column("answer_type")
    streaming: bool = field(default=False, metadata={"help": "Stream the training data (needs --max_steps)."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    answer_strategy: str = field(
        default="consensus",
        metadata={"help": "'consensus': multiple_choice_answer; 'sample': a human answer drawn at each use."},
    )
    skip_missing_images: bool = field(default=False, metadata={"help": "Drop questions whose image is missing."})
    show_examples: int = field(default=8, metadata={"help": "Held-out questions printed with answers at the end."})


def _parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments))


def _read_recipe(path: Path, known: set[str]) -> dict:
    text = path.read_text()
    values = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values")
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown arguments {unknown}")
    return values


def _flags_given(argv: list[str]) -> set[str]:
    """The arguments set on the command line itself (abbreviations and `--no_x` forms included)."""
    probe = _parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given, _ = probe.parse_known_args(argv)
    return set(vars(given))


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, Seq2SeqTrainingArguments]:
    """A YAML/JSON recipe, flags, or both (flags override the recipe; data flags replace the recipe's data);
    no arguments at all runs the demo. Then `check_run_mode` completes and checks them."""
    parser = _parser()
    parser.set_defaults(**SCRIPT_DEFAULTS)
    if not argv:
        argv = [str(DEMO_CONFIG)]
    recipe = {}
    if argv[0].endswith((".yaml", ".yml", ".json")):
        recipe = _read_recipe(Path(argv[0]), {action.dest for action in parser._actions})
        argv = argv[1:]
    recipe_data = sorted(set(recipe) & set(DATA_SOURCE_ARGUMENTS))
    command_line_data = sorted(_flags_given(argv) & set(DATA_SOURCE_ARGUMENTS))
    if recipe_data and command_line_data:
        logger.warning("data from the command line (%s) replaces the recipe's (%s)", command_line_data, recipe_data)
        recipe = {name: value for name, value in recipe.items() if name not in DATA_SOURCE_ARGUMENTS}
    if not torch.cuda.is_available():
        # Without use_cpu, processes started by torchrun or `accelerate launch --multi_gpu` on a machine without
        # CUDA share their data but never their gradients or predictions (accelerate sees no distributed setup);
        # with it they form one gloo job. Pinned memory has no use there either (torch warns at every loader).
        parser.set_defaults(use_cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1, dataloader_pin_memory=False)
    parser.set_defaults(**recipe)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.answer_strategy not in ANSWER_STRATEGIES:
        raise ValueError(f"--answer_strategy must be one of {ANSWER_STRATEGIES}, got {data_args.answer_strategy!r}")
    if model_args.preset not in (None, "tiny"):
        raise ValueError(f"--preset must be 'tiny' or unset, got {model_args.preset!r}")
    for name, kinds in (
        ("tiny_question_encoder", QUESTION_ENCODERS),
        ("tiny_vision_encoder", VISION_ENCODERS),
        ("tiny_decoder", DECODERS),
    ):
        if getattr(model_args, name) not in kinds:
            raise ValueError(f"--{name} must be one of {kinds}, got {getattr(model_args, name)!r}")
    check_run_mode(model_args, data_args, training_args)
    return model_args, data_args, training_args


def check_run_mode(model_args: ModelArguments, data_args: DataArguments, training_args: Seq2SeqTrainingArguments):
    """Set `do_train`/`do_eval` from the data given when neither the recipe nor a flag did, and refuse what
    would fail late (after training) or touch what the user owns."""
    sources = [
        name
        for name, given in (
            ("--synthetic_data_dir", data_args.synthetic_data_dir),
            ("--dataset_name", data_args.dataset_name),
            ("--train_*/--eval_* files", data_args.train_questions or data_args.eval_questions),
        )
        if given
    ]
    if len(sources) > 1:
        raise ValueError(f"give one source of data, not {' and '.join(sources)}")
    whole_source = bool(data_args.synthetic_data_dir or data_args.dataset_name)
    has_train, has_eval = whole_source or bool(data_args.train_questions), whole_source or bool(data_args.eval_questions)
    if training_args.do_train is None:
        training_args.do_train = has_train
    if training_args.do_eval is None:
        training_args.do_eval = has_eval
    if training_args.do_train and not has_train:
        raise ValueError("--do_train needs training data: --train_questions/_annotations/_images or --dataset_name")
    if training_args.do_eval and not has_eval:
        raise ValueError("--do_eval needs evaluation data: --eval_questions/_images or --dataset_name")
    if not (training_args.do_train or training_args.do_eval):
        raise ValueError("nothing to do: give training data, evaluation data, or both (and --do_train/--do_eval)")
    if training_args.do_train and data_args.train_questions:
        _require(data_args, "train", ("annotations", "images"))
    if training_args.do_eval and data_args.eval_questions:
        _require(data_args, "eval", ("images",))
    if training_args.eval_strategy != "no" and not training_args.do_eval:
        raise ValueError(f"--eval_strategy {training_args.eval_strategy.value} needs evaluation data and --do_eval")
    if not training_args.predict_with_generate and training_args.do_eval:
        raise ValueError("evaluation scores generated answers: --predict_with_generate must stay true")
    if training_args.remove_unused_columns:
        raise ValueError("the collator reads the raw image/question/answer columns: --remove_unused_columns false")
    if not training_args.do_train:
        _check_evaluation_only(model_args, training_args)


def _require(data_args: DataArguments, split: str, kinds: tuple[str, ...]) -> None:
    missing = [f"--{split}_{kind}" for kind in kinds if not getattr(data_args, f"{split}_{kind}")]
    if missing:
        raise ValueError(f"--{split}_questions needs {' and '.join(missing)}")


def _check_evaluation_only(model_args: ModelArguments, training_args: Seq2SeqTrainingArguments) -> None:
    """Evaluation without training needs a trained model, and never writes into its folder."""
    model = model_args.model_name_or_path
    if model is None:
        raise ValueError("evaluation without training needs a trained model: --model_name_or_path")
    if training_args.push_to_hub:
        raise ValueError("--push_to_hub uploads a trained model: this run does not train (--do_train false)")
    if Path(model).is_dir() and Path(training_args.output_dir).resolve() == Path(model).resolve():
        raise ValueError(
            f"--output_dir {training_args.output_dir} is the folder of --model_name_or_path: evaluation would write "
            "its eval_results.json and predictions.json over the model's own; give another --output_dir"
        )


def use_all_cores_in_a_single_cpu_process(training_args: Seq2SeqTrainingArguments) -> None:
    """`accelerate launch` without `--cpu` sets OMP_NUM_THREADS=1 for its one process, which halves the demo's
    speed on a 2-core machine; a lone CPU process gets every core it may run on."""
    if training_args.device.type == "cpu" and training_args.world_size == 1:
        torch.set_num_threads(max(torch.get_num_threads(), len(os.sched_getaffinity(0))))


def writer_first(training_args: Seq2SeqTrainingArguments, desc: str):
    """The process that writes shared files (data, components) goes first; the others wait, then read. One
    writer per job, or per node with `--save_on_each_node` (nodes without shared storage), as for checkpoints."""
    return training_args.main_process_first(local=training_args.save_on_each_node, desc=desc)


def is_writer(training_args: Seq2SeqTrainingArguments) -> bool:
    index = training_args.local_process_index if training_args.save_on_each_node else training_args.process_index
    return index == 0


def load_datasets(data_args: DataArguments, training_args: Seq2SeqTrainingArguments):
    """(train, eval) datasets in the row contract of `vqa_data`, each `None` unless its step runs."""
    if data_args.synthetic_data_dir:
        with writer_first(training_args, "making the shapes dataset"):
            files = make_shapes_vqa(
                data_args.synthetic_data_dir,
                num_train_images=data_args.synthetic_train_images,
                num_val_images=data_args.synthetic_eval_images,
                jitter=data_args.synthetic_jitter,
                seed=training_args.seed,
            )

        def load(split: str):
            return load_vqa_files(*(files[f"{split}_{kind}"] for kind in SPLIT_FILES))

    elif data_args.dataset_name:
        mapping = {
            target: source
            for target, source in (
                ("image", data_args.image_column),
                ("question", data_args.question_column),
                ("answers", data_args.answers_column),
                ("multiple_choice_answer", data_args.answer_column),
                ("question_id", data_args.question_id_column),
                ("image_id", data_args.image_id_column),
                ("answer_type", data_args.answer_type_column),
            )
            if source is not None
        }

        def load(split: str):
            rows = load_vqa_dataset(
                data_args.dataset_name,
                split=data_args.train_split if split == "train" else data_args.eval_split,
                column_mapping=mapping,
                streaming=data_args.streaming,
                images_dir=data_args.images_dir,
                skip_missing_images=data_args.skip_missing_images,
            )
            if data_args.streaming and split == "eval":
                if not data_args.max_eval_samples:
                    raise ValueError("--streaming evaluation needs --max_eval_samples (the held-out set is kept in memory)")
                rows = datasets.Dataset.from_list(list(rows.take(data_args.max_eval_samples)))
            return rows

    else:

        def load(split: str):
            questions, annotations, images = (getattr(data_args, f"{split}_{kind}") for kind in SPLIT_FILES)
            return load_vqa_files(questions, annotations, images, skip_missing_images=data_args.skip_missing_images)

    train = load("train") if training_args.do_train else None
    eval_ = load("eval") if training_args.do_eval else None
    if train is not None and data_args.max_train_samples:
        train = train.take(data_args.max_train_samples) if data_args.streaming else train.select(
            range(min(data_args.max_train_samples, len(train)))
        )
    if eval_ is not None and data_args.max_eval_samples and len(eval_) > data_args.max_eval_samples:
        eval_ = eval_.select(range(data_args.max_eval_samples))
    return train, eval_


def build_model_and_processor(model_args: ModelArguments, train_dataset, training_args: Seq2SeqTrainingArguments):
    """A trained model to continue or evaluate, pretrained components to fine-tune, or the tiny preset."""
    if model_args.model_name_or_path:
        model = VqaFusionForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
        # This script's own classes load the folder: its copy of the code is never needed, and without
        # `trust_remote_code=False` the tokenizers' config lookup would ask on the terminal whether to run it.
        processor = VqaFusionProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=False)
    else:
        parts = dict(
            question_encoder=model_args.question_encoder,
            vision_encoder=model_args.vision_encoder,
            decoder=model_args.decoder,
        )
        if model_args.preset == "tiny":
            if train_dataset is None or isinstance(train_dataset, datasets.IterableDataset):
                raise ValueError("--preset tiny trains its tokenizers on the training text: give a (non-streaming) train set")
            folder = Path(training_args.output_dir) / TINY_COMPONENTS
            with writer_first(training_args, "building the tiny components"):
                if is_writer(training_args):
                    answers = [answer for row in train_dataset["answers"] for answer in row]
                    build_tiny_components(
                        folder,
                        train_dataset["question"],
                        answers,
                        question=model_args.tiny_question_encoder,
                        vision=model_args.tiny_vision_encoder,
                        decoder=model_args.tiny_decoder,
                        sizes=TinySizes(max_answer_positions=PREFIX_POSITIONS) if model_args.fusion == "prefix" else None,
                    )
            parts = {name: str(folder / name) for name in parts}
        model = VqaFusionForConditionalGeneration.from_pretrained_components(
            **parts,
            fusion=model_args.fusion,
            fusion_layers=model_args.fusion_layers,
            initializer_range=model_args.initializer_range,
        )
        processor = VqaFusionProcessor.from_pretrained_components(**parts)
    processor.max_answer_length = model_args.max_answer_length
    model.freeze(model_args.freeze)
    if model_args.lora_r:
        add_lora(
            model,
            r=model_args.lora_r,
            alpha=model_args.lora_alpha,
            dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
            parts=model_args.lora_parts,
        )
    apply_generation_settings(model, training_args)
    return model, processor


def apply_generation_settings(model: VqaFusionForConditionalGeneration, training_args: Seq2SeqTrainingArguments):
    """`--generation_max_length` bounds the generated sequence as transformers' `max_length` does (the decoder
    start token included). A `max_new_tokens` in the model's generation config would override it (with a
    warning at every evaluation), so it is dropped when the user gives a length."""
    if training_args.generation_max_length is not None and model.generation_config.max_new_tokens is not None:
        logger.info(
            "--generation_max_length %d replaces the model's max_new_tokens=%d",
            training_args.generation_max_length,
            model.generation_config.max_new_tokens,
        )
        model.generation_config.max_new_tokens = None


class VqaTrainer(Seq2SeqTrainer):
    """`Seq2SeqTrainer` with the evaluation collator kept apart from the training one (no sampled answers at
    evaluation) and this project's model card."""

    def __init__(self, *args, eval_data_collator=None, model_card: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator or self.data_collator
        self.model_card = model_card

    def _with_eval_collator(self, method, dataset):
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return method(dataset)
        finally:
            self.data_collator = train_collator

    def get_eval_dataloader(self, eval_dataset=None):
        return self._with_eval_collator(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._with_eval_collator(super().get_test_dataloader, test_dataset)

    def evaluation_loop(self, *args, **kwargs):
        """Under N processes the sampler repeats a few questions so that every process gets full batches.
        `Seq2SeqTrainer` gathers the generated answers with `accelerator.gather`, which keeps those repeats
        (32 predictions for 30 questions); `gather_for_metrics` drops them, so every question is predicted and
        scored once, in the dataset's order, as in one process."""
        self.gather_function = self.accelerator.gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """Checkpoints keep the model's own weight names. transformers 5 saves some parts (ViT among them)
        under their original checkpoint names, which `from_pretrained` maps back but the Trainer's resume, a
        plain `load_state_dict`, does not: it would warn and train on with those weights at their start
        values. The final model keeps the original names, as every checkpoint on the Hub has them."""
        self.model.save_pretrained = functools.partial(self.model.save_pretrained, save_original_format=False)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self.model.save_pretrained

    def create_model_card(self, **kwargs) -> None:
        if self.is_world_process_zero() and self.model_card:
            Path(self.args.output_dir, "README.md").write_text(self.model_card)


def is_labelled(eval_dataset: datasets.Dataset) -> bool:
    """Whether every question has human answers (scored) or none has (test-dev, test: predicted only)."""
    unlabelled = [qid for qid, answers in zip(eval_dataset["question_id"], eval_dataset["answers"]) if not answers]
    if unlabelled and len(unlabelled) < len(eval_dataset):
        raise VqaDataError(
            f"{len(unlabelled)} of {len(eval_dataset)} evaluation questions have no answers (first question ids: "
            f"{unlabelled[:5]}): give answers for all of them, or for none to predict without scoring"
        )
    return not unlabelled


def make_compute_metrics(processor: VqaFusionProcessor, eval_dataset):
    """`compute_metrics` for `predict_with_generate`: generated ids -> answers -> official VQA accuracy. The
    Trainer returns the predictions in the dataset's order, each question once, whatever the number of
    processes."""
    answers = eval_dataset["answers"]
    answer_types = eval_dataset["answer_type"]

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions = processor.batch_decode(eval_prediction.predictions)
        return vqa_accuracy(predictions, answers, answer_types)

    return compute_metrics


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` whose trainer state was fully written (it is saved last), so a checkpoint cut
    off while being written never poisons a resume."""
    complete = []
    for folder in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = folder.name.rsplit("-", 1)[-1]
        try:
            json.loads((folder / TRAINER_STATE_NAME).read_text())
        except (OSError, ValueError):
            continue
        if step.isdigit():
            complete.append((int(step), str(folder)))
    return max(complete)[1] if complete else None


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """`--resume_from_checkpoint last` (or `true`) finds the newest complete checkpoint; a path is checked."""
    if value is None:
        return None
    if value.lower() in ("last", "latest", "true"):
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            logger.warning("no complete checkpoint in %s: training from the start", output_dir)
        return checkpoint
    if not (Path(value) / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no {TRAINER_STATE_NAME})")
    return value


def write_predictions(path: Path, question_ids: list[int], answers: list[str]) -> None:
    """The official results format: `[{"question_id": int, "answer": str}]`."""
    rows = [{"question_id": int(qid), "answer": answer} for qid, answer in zip(question_ids, answers)]
    path.write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> dict[str, float]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    use_all_cores_in_a_single_cpu_process(training_args)

    train_dataset, eval_dataset = load_datasets(data_args, training_args)
    model, processor = build_model_and_processor(model_args, train_dataset, training_args)
    trainable = describe_trainable(model)
    logger.info(
        "model: %s fusion, %s parameters, trainable: %s", model.config.fusion, f"{model.num_parameters():,}", trainable
    )
    labelled = eval_dataset is not None and is_labelled(eval_dataset)

    trainer = VqaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=VqaCollator(
            processor, answer_strategy=data_args.answer_strategy, seed=training_args.seed, model=model
        ),
        eval_data_collator=VqaCollator(processor, answer_strategy="consensus" if labelled else None, model=model),
        compute_metrics=make_compute_metrics(processor, eval_dataset) if labelled else None,
    )

    metrics: dict[str, float] = {}
    if training_args.do_train:
        resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
        check_checkpoint_adapters(model, resume)
        train_result = trainer.train(resume_from_checkpoint=resume)
        # LoRA adapters merged into their weights: what is saved, evaluated and loaded later is one plain model.
        merge_lora(model)
        # Saved before any evaluation: a failure there loses nothing of the training run.
        trainer.save_model()
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        if is_writer(training_args):
            plot_training_curves(trainer.state.log_history, Path(training_args.output_dir) / CURVES_NAME)
    if training_args.do_eval:
        prediction = trainer.predict(eval_dataset, metric_key_prefix="eval")
        if labelled:
            metrics = {**prediction.metrics, "eval_samples": len(eval_dataset)}
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            answers = processor.batch_decode(prediction.predictions)
            write_predictions(Path(training_args.output_dir) / "predictions.json", eval_dataset["question_id"], answers)
            logger.info("wrote %d predictions to %s", len(answers), Path(training_args.output_dir) / "predictions.json")
            show_examples(eval_dataset, answers, data_args.show_examples)
    if training_args.do_train:
        trainer.model_card = render_model_card(
            model_args, data_args, training_args, model, metrics, trainable, curves=True
        )
        trainer.create_model_card()
        if training_args.push_to_hub:
            trainer.push_to_hub(commit_message="vqa-fusion fine-tuning")
    return metrics


def show_examples(eval_dataset, answers: list[str], count: int) -> None:
    """Print the first few held-out questions with the model's answer next to the truth."""
    if count <= 0:
        return
    print(f"\n{'question':<48} {'model':<12} truth")
    for index in range(min(count, len(answers))):
        row = eval_dataset[index]
        truth = row["multiple_choice_answer"] or "?"
        print(f"{row['question']:<48} {answers[index]:<12} {truth}")


if __name__ == "__main__":
    main()
