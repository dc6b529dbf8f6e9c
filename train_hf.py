"""Fine-tune and evaluate vqa-fusion with `Seq2SeqTrainer`.

    accelerate launch train_hf.py                        # the offline demo (configs/demo.yaml)
    accelerate launch train_hf.py configs/vqav2.yaml     # a recipe file
    accelerate launch train_hf.py configs/vqav2.yaml --learning_rate 1e-4   # flags override the file

Writes to `--output_dir`: the model and processor with their remote code, `eval_results.json`,
`predictions.json` (the official results format) and a model card (`README.md`).
"""

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
from modeling_vqa_fusion import FREEZE_SPECS, VqaFusionForConditionalGeneration
from processing_vqa_fusion import VqaFusionProcessor
from tiny_components import build_tiny_components
from vqa_data import VqaCollator, load_vqa_dataset, load_vqa_files, make_shapes_vqa
from vqa_metric import vqa_accuracy

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
ANSWER_STRATEGIES = ("consensus", "sample")
SPLIT_FILES = ("questions", "annotations", "images")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved vqa-fusion checkpoint (folder or hub id) to continue training."}
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
    eval_questions: str | None = field(default=None)
    eval_annotations: str | None = field(default=None)
    eval_images: str | None = field(default=None)
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` source: hub id, local data files folder or save_to_disk folder."}
    )
    train_split: str = field(default="train")
    eval_split: str = field(default="validation")
    images_dir: str | None = field(default=None, metadata={"help": "Base folder for relative image paths."})
    image_column: str = field(default="image")
    question_column: str = field(default="question")
    answers_column: str = field(default="answers")
    answer_column: str = field(default="multiple_choice_answer", metadata={"help": "The consensus answer."})
    question_id_column: str = field(default="question_id")
    image_id_column: str = field(default="image_id")
    answer_type_column: str = field(default="answer_type")
    streaming: bool = field(default=False, metadata={"help": "Stream the training data (needs --max_steps)."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    answer_strategy: str = field(
        default="consensus",
        metadata={"help": "'consensus': multiple_choice_answer; 'sample': a human answer drawn at each use."},
    )
    skip_missing_images: bool = field(default=False, metadata={"help": "Drop questions whose image is missing."})
    show_examples: int = field(default=8, metadata={"help": "Held-out questions printed with answers at the end."})


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, Seq2SeqTrainingArguments]:
    """A YAML/JSON file, flags, or both (flags override the file); no arguments at all runs the demo."""
    parser = HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments))
    if not argv:
        argv = [str(DEMO_CONFIG)]
    if argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv[0])
        text = path.read_text()
        values = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of argument names to values")
        known = {f.dest for f in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown arguments {unknown}")
        parser.set_defaults(**values)
        argv = argv[1:]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.answer_strategy not in ANSWER_STRATEGIES:
        raise ValueError(f"--answer_strategy must be one of {ANSWER_STRATEGIES}, got {data_args.answer_strategy!r}")
    if model_args.preset not in (None, "tiny"):
        raise ValueError(f"--preset must be 'tiny' or unset, got {model_args.preset!r}")
    return model_args, data_args, training_args


def use_all_cores_in_a_single_cpu_process(training_args: Seq2SeqTrainingArguments) -> None:
    """`accelerate launch` without `--cpu` sets OMP_NUM_THREADS=1 for its one process, which halves the demo's
    speed on a 2-core machine; a lone CPU process gets every core it may run on."""
    if training_args.device.type == "cpu" and training_args.world_size == 1:
        torch.set_num_threads(max(torch.get_num_threads(), len(os.sched_getaffinity(0))))


def load_datasets(data_args: DataArguments, training_args: Seq2SeqTrainingArguments):
    """(train, eval) datasets in the row contract of `vqa_data`; the shapes dataset is made if asked for."""
    if data_args.synthetic_data_dir:
        with training_args.main_process_first(desc="making the shapes dataset"):
            files = make_shapes_vqa(
                data_args.synthetic_data_dir,
                num_train_images=data_args.synthetic_train_images,
                num_val_images=data_args.synthetic_eval_images,
                jitter=data_args.synthetic_jitter,
                seed=training_args.seed,
            )
        for split in ("train", "eval"):
            for kind in SPLIT_FILES:
                setattr(data_args, f"{split}_{kind}", str(files[f"{split}_{kind}"]))

    if data_args.train_questions or data_args.eval_questions:

        def load_files(split: str):
            questions, annotations, images = (getattr(data_args, f"{split}_{kind}") for kind in SPLIT_FILES)
            if not questions:
                return None
            return load_vqa_files(questions, annotations, images, skip_missing_images=data_args.skip_missing_images)

        train, eval_ = load_files("train"), load_files("eval")
    elif data_args.dataset_name:
        mapping = {
            "image": data_args.image_column,
            "question": data_args.question_column,
            "answers": data_args.answers_column,
            "multiple_choice_answer": data_args.answer_column,
            "question_id": data_args.question_id_column,
            "image_id": data_args.image_id_column,
            "answer_type": data_args.answer_type_column,
        }

        def load(split: str, streaming: bool):
            return load_vqa_dataset(
                data_args.dataset_name,
                split=split,
                column_mapping=mapping,
                streaming=streaming,
                images_dir=data_args.images_dir,
                skip_missing_images=data_args.skip_missing_images,
            )

        train = load(data_args.train_split, data_args.streaming) if training_args.do_train else None
        eval_ = load(data_args.eval_split, data_args.streaming) if training_args.do_eval else None
        if data_args.streaming and eval_ is not None:
            if not data_args.max_eval_samples:
                raise ValueError("--streaming evaluation needs --max_eval_samples (the held-out set is kept in memory)")
            eval_ = datasets.Dataset.from_list(list(eval_.take(data_args.max_eval_samples)))
    else:
        raise ValueError("give data: --train_questions/--eval_questions files, --dataset_name or --synthetic_data_dir")

    if train is not None and data_args.max_train_samples:
        train = train.take(data_args.max_train_samples) if data_args.streaming else train.select(
            range(min(data_args.max_train_samples, len(train)))
        )
    if eval_ is not None and data_args.max_eval_samples and len(eval_) > data_args.max_eval_samples:
        eval_ = eval_.select(range(data_args.max_eval_samples))
    return train, eval_


def build_model_and_processor(model_args: ModelArguments, train_dataset, training_args: Seq2SeqTrainingArguments):
    """A checkpoint to continue, pretrained components to fine-tune, or the tiny preset for offline runs."""
    if model_args.model_name_or_path:
        model = VqaFusionForConditionalGeneration.from_pretrained(model_args.model_name_or_path)
        processor = VqaFusionProcessor.from_pretrained(model_args.model_name_or_path)
    else:
        parts = dict(
            question_encoder=model_args.question_encoder,
            vision_encoder=model_args.vision_encoder,
            decoder=model_args.decoder,
        )
        if model_args.preset == "tiny":
            if train_dataset is None or isinstance(train_dataset, datasets.IterableDataset):
                raise ValueError("--preset tiny trains its tokenizers on the training text: give a (non-streaming) train set")
            folder = Path(training_args.output_dir) / "tiny_components"
            with training_args.main_process_first(desc="building the tiny components"):
                if training_args.local_process_index == 0:
                    answers = [answer for row in train_dataset["answers"] for answer in row]
                    build_tiny_components(folder, train_dataset["question"], answers)
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
    return model, processor


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

    def create_model_card(self, **kwargs) -> None:
        if self.is_world_process_zero() and self.model_card:
            Path(self.args.output_dir, "README.md").write_text(self.model_card)


def make_compute_metrics(processor: VqaFusionProcessor, eval_dataset):
    """`compute_metrics` for `predict_with_generate`: generated ids -> answers -> official VQA accuracy."""
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


def render_model_card(model_args, data_args, training_args, model, metrics: dict[str, float], trainable: str) -> str:
    """A model card recording components, fusion, data, hyper-parameters and measured accuracy."""
    config = model.config
    repo = training_args.hub_model_id or Path(training_args.output_dir).name
    data = data_args.dataset_name or data_args.train_questions or "(none)"
    accuracy = "\n".join(f"| {name} | {value} |" for name, value in sorted(metrics.items()) if "vqa_accuracy" in name)
    hyper = {
        "fusion_layers": config.fusion_layers,
        "initializer_range": model_args.initializer_range,
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": str(training_args.lr_scheduler_type),
        "warmup_steps": training_args.warmup_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "answer_strategy": data_args.answer_strategy,
        "freeze": model_args.freeze,
        "lora_r": model_args.lora_r,
        "bf16": training_args.bf16,
        "fp16": training_args.fp16,
        "seed": training_args.seed,
    }
    if model_args.lora_r:
        hyper |= {name: value for name, value in vars(model_args).items() if name.startswith("lora_")}
    components = "\n".join(
        f"| {name.replace('_', ' ')} | {sub.model_type} (`{sub._name_or_path or 'from config'}`) |"
        for name in ("question_encoder", "vision_encoder", "decoder")
        for sub in [getattr(config, name)]
    )
    hyper_rows = "\n".join(f"| {name} | {value} |" for name, value in hyper.items())
    reading = "as a prefix of its input" if config.fusion == "prefix" else "through cross-attention"
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [vqa-fusion, visual-question-answering]
---

# {repo}

A vqa-fusion visual question answering model: a question encoder and a vision encoder, projected and
fused ({config.fusion} fusion) into tokens that a decoder reads {reading} to generate the answer.

| component | model |
|---|---|
{components}
| parameters | {model.num_parameters():,} |
| trainable parameters (in training, adapters included) | {trainable} |

Training data: `{data}`.

## Hyper-parameters
| name | value |
|---|---|
{hyper_rows}

## Evaluation (official VQA accuracy, {metrics.get("eval_samples", "?")} questions)
| metric | value |
|---|---|
{accuracy}

## Usage
```python
from transformers import AutoModel, AutoProcessor
from PIL import Image

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
inputs = processor(images=[Image.open("photo.jpg")], text=["What color is the bus?"], return_tensors="pt")
print(processor.batch_decode(model.generate(**inputs), skip_special_tokens=True))
```
"""


def write_predictions(path: Path, question_ids: list[int], answers: list[str]) -> None:
    """The official results format: `[{"question_id": int, "answer": str}]`."""
    rows = [{"question_id": int(qid), "answer": answer} for qid, answer in zip(question_ids, answers)]
    path.write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    use_all_cores_in_a_single_cpu_process(training_args)

    train_dataset, eval_dataset = load_datasets(data_args, training_args)
    model, processor = build_model_and_processor(model_args, train_dataset, training_args)
    trainable = describe_trainable(model)
    logger.info(
        "model: %s fusion, %s parameters, trainable: %s", model.config.fusion, f"{model.num_parameters():,}", trainable
    )
    has_labels = eval_dataset is not None and all(a is not None for a in eval_dataset["multiple_choice_answer"])

    trainer = VqaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=VqaCollator(processor, answer_strategy=data_args.answer_strategy, seed=training_args.seed),
        eval_data_collator=VqaCollator(processor, answer_strategy="consensus" if has_labels else None),
        compute_metrics=make_compute_metrics(processor, eval_dataset) if eval_dataset is not None else None,
    )

    metrics: dict[str, float] = {}
    if training_args.do_train:
        resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
        check_checkpoint_adapters(model, resume)
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
    if eval_dataset is not None:
        prediction = trainer.predict(eval_dataset, metric_key_prefix="eval")
        metrics = {**prediction.metrics, "eval_samples": len(eval_dataset)}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if trainer.is_world_process_zero():
            answers = processor.batch_decode(prediction.predictions)
            write_predictions(Path(training_args.output_dir) / "predictions.json", eval_dataset["question_id"], answers)
            show_examples(eval_dataset, answers, data_args.show_examples)

    merge_lora(model)
    trainer.model_card = render_model_card(model_args, data_args, training_args, model, metrics, trainable)
    trainer.save_model()
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
