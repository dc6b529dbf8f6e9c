"""What a training run leaves for people to read: `training_curves.png` (loss, learning rate and, when evaluation
ran during training, accuracy per answer type, over the steps) and the model card (`README.md`), whose YAML
front matter carries the evaluation as `model-index` results the Hub shows and indexes."""

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from huggingface_hub import EvalResult, ModelCardData  # noqa: E402

CURVES_NAME = "training_curves.png"
ACCURACY_PREFIX = "eval_vqa_accuracy"
TASK = "visual-question-answering"


def public_name(name_or_path: str) -> str:
    """What a model card may show of a component or data source: a hub id as is, a local path by its last
    name only (a card is published; the paths of the machine that trained are nobody's business)."""
    return Path(name_or_path).name if os.path.exists(name_or_path) else name_or_path


def curve_series(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """`Trainer.state.log_history` -> `{name: [(step, value), ...]}`: `loss` and `learning_rate` of the training
    logs, and every `eval_vqa_accuracy*` of the evaluations (overall and per answer type)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for entry in log_history:
        for name, value in entry.items():
            if name in ("loss", "learning_rate") or name.startswith(ACCURACY_PREFIX):
                series.setdefault(name, []).append((entry["step"], float(value)))
    return series


def plot_training_curves(log_history: list[dict], path: str | Path) -> Path:
    """Draw `curve_series(log_history)` into a PNG at `path`: training loss, learning rate and, if any,
    evaluation accuracy per answer type, against the optimizer step."""
    series = curve_series(log_history)
    accuracies = sorted(name for name in series if name.startswith(ACCURACY_PREFIX))
    panels = [("loss", ["loss"]), ("learning rate", ["learning_rate"])]
    if accuracies:
        panels.append(("VQA accuracy (%)", accuracies))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for axis, (title, names) in zip(axes[0], panels):
        for name in names:
            steps, values = zip(*series[name]) if name in series else ((), ())
            label = name.removeprefix(ACCURACY_PREFIX).strip("_").replace("_", " ") or "overall"
            axis.plot(steps, values, marker="o" if len(steps) < 20 else None, label=label)
        axis.set_title(title)
        axis.set_xlabel("step")
        if len(names) > 1:
            axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return Path(path)


def evaluation_dataset(data_args) -> tuple[str, str, str]:
    """`(type, name, split)` of the held-out data the accuracy was measured on, as `model-index` names them."""
    if data_args.synthetic_data_dir:
        return "vqa-fusion/shapes", "synthetic shapes (shapes_data.py)", "shapes_val"
    if data_args.dataset_name:
        name = public_name(data_args.dataset_name)
        return name, name, data_args.eval_split
    name = public_name(data_args.eval_questions)
    try:
        split = json.loads(Path(data_args.eval_questions).read_text()).get("data_subtype") or name
    except (OSError, ValueError, AttributeError):
        split = name
    return "vqa_v2", name, split


def card_metadata(repo: str, data_args, metrics: dict[str, float], base_models: list[str]) -> ModelCardData:
    """The front matter: library, pipeline, tags, the pretrained parts on the Hub (`base_model`) and one
    `model-index` result per accuracy (overall and per answer type) with the dataset and split it was measured on
    (none when the run measured none)."""
    accuracies = {name: value for name, value in sorted(metrics.items()) if name.startswith(ACCURACY_PREFIX)}
    dataset_type, dataset_name, split = evaluation_dataset(data_args) if accuracies else (None, None, None)
    results = [
        EvalResult(
            task_type=TASK,
            task_name="Visual Question Answering",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type="vqa_accuracy",
            metric_name=name.removeprefix("eval_").replace("_", " "),
            metric_value=value,
            metric_config=name.removeprefix(ACCURACY_PREFIX).strip("_") or None,
        )
        for name, value in accuracies.items()
    ]
    return ModelCardData(
        model_name=repo,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["vqa-fusion", TASK],
        base_model=base_models or None,
        eval_results=results or None,
    )


def describe_training_data(data_args) -> str:
    if data_args.synthetic_data_dir:
        return f"the synthetic shapes dataset (`shapes_data.py`, {data_args.synthetic_train_images:,} training images)"
    if data_args.dataset_name:
        return f"`{public_name(data_args.dataset_name)}` (split `{data_args.train_split}`)"
    return f"`{public_name(data_args.train_questions)}`"


def render_model_card(
    model_args, data_args, training_args, model, metrics: dict[str, float], trainable: str, curves: bool = False
) -> str:
    """A model card recording components (by hub id where they came from the Hub), fusion, the data and
    hyper-parameters of this training run, the accuracy measured after it (also as `model-index` results in the
    front matter) and, with `curves`, the embedded `training_curves.png`."""
    config = model.config
    repo = training_args.hub_model_id or Path(training_args.output_dir).name
    hyper = {
        "fusion_layers": config.fusion_layers,
        "initializer_range": model_args.initializer_range,
        "learning_rate": training_args.learning_rate,
        "lr_scheduler_type": training_args.lr_scheduler_type.value,
        "warmup_steps": training_args.warmup_steps,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "processes": training_args.world_size,
        "num_train_epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps,
        "label_smoothing_factor": training_args.label_smoothing_factor,
        "answer_strategy": data_args.answer_strategy,
        "freeze": model_args.freeze,
        "lora_r": model_args.lora_r,
        "bf16": training_args.bf16,
        "fp16": training_args.fp16,
        "seed": training_args.seed,
    }
    if model_args.lora_r:
        hyper |= {name: value for name, value in vars(model_args).items() if name.startswith("lora_")}

    tiny = model_args.preset == "tiny" and not model_args.model_name_or_path

    def origin(sub) -> str:
        if tiny:
            return "tiny preset, built offline"
        return f"`{public_name(sub._name_or_path)}`" if sub._name_or_path else "from config"

    components = "\n".join(
        f"| {name.replace('_', ' ')} | {sub.model_type} ({origin(sub)}) |"
        for name in ("question_encoder", "vision_encoder", "decoder")
        for sub in [getattr(config, name)]
    )
    start = f"Fine-tuned from `{public_name(model_args.model_name_or_path)}`. " if model_args.model_name_or_path else ""
    hyper_rows = "\n".join(f"| {name} | {value} |" for name, value in hyper.items())
    accuracy = "\n".join(f"| {name} | {value} |" for name, value in sorted(metrics.items()) if "vqa_accuracy" in name)
    if accuracy:
        evaluation = f"Official VQA accuracy on {metrics['eval_samples']:,} held-out questions:\n\n| metric | value |\n|---|---|\n{accuracy}"
    else:
        evaluation = "Not measured in this training run."
    reading = "as a prefix of its input" if config.fusion == "prefix" else "through cross-attention"
    base_models = [
        sub._name_or_path
        for sub in (config.question_encoder, config.vision_encoder, config.decoder)
        if not tiny and sub._name_or_path and public_name(sub._name_or_path) == sub._name_or_path
    ]
    metadata = card_metadata(repo, data_args, metrics, base_models)
    if accuracy:
        _, dataset_name, split = evaluation_dataset(data_args)
        evaluation += (
            f"\n\nMeasured by `train_hf.py` after training: answers generated with the model's generation config "
            f"(greedy unless it says otherwise) for every question of split `{split}` of {dataset_name}, scored with "
            "the official VQA accuracy (`vqa_metric.py`: min(#humans who gave the answer / 3, 1), averaged over the "
            "10 choose 9 subsets of the human answers, after the official answer normalisation), in percent."
        )
    plots = f"\n\n## Training curves\n![training curves]({CURVES_NAME})" if curves else ""
    return f"""---
{metadata.to_yaml()}
---

# {repo}

A vqa-fusion visual question answering model: a question encoder and a vision encoder, projected and
fused ({config.fusion} fusion) into tokens that a decoder reads {reading} to generate the answer.

| component | model |
|---|---|
{components}
| parameters | {model.num_parameters():,} |
| trainable parameters (in training, adapters included) | {trainable} |

{start}Training data: {describe_training_data(data_args)}.

## Hyper-parameters
| name | value |
|---|---|
{hyper_rows}

## Evaluation
{evaluation}{plots}

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


__all__ = ["CURVES_NAME", "card_metadata", "curve_series", "plot_training_curves", "public_name", "render_model_card"]
