"""LoRA adapters (`peft`) on the pretrained parts of a vqa-fusion model, and merging them back.

    add_lora(model, r=8)                  # adapters on the decoder's linear layers; its other weights frozen
    describe_trainable(model)             # "30,729,216 of 307,330,560 (10.00 %)", for logs and model cards
    merge_lora(model)                     # W += (alpha / r) B A everywhere: a plain model again, saved without peft

The adapters are injected in place (`peft.inject_adapter_in_model`), so the model stays a
`VqaFusionForConditionalGeneration`: the Trainer saves it, with its adapters, in every checkpoint and loads it back
on resume like any other model. Only training needs peft; the merged model does not.
"""

import json
import re
from collections.abc import Sequence
from pathlib import Path

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import NoMatchingPeftModuleError
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from modeling_vqa_fusion import CROSS_ATTENTION_MARKERS

# Where each pretrained part sits in a `VqaFusionForConditionalGeneration`. The fusion is never a choice: it is new,
# so it trains in full.
LORA_PARTS = {
    "decoder": "decoder",
    "question_encoder": "encoder.question_encoder",
    "vision_encoder": "encoder.vision_encoder",
}
ALL_LINEAR = "all-linear"
_CROSS_ATTENTION = re.compile(f".*({'|'.join(map(re.escape, CROSS_ATTENTION_MARKERS))}).*")


def _names(value: str | Sequence[str]) -> list[str]:
    """`"a, b"` or `["a", "b"]` -> `["a", "b"]`."""
    items = value.split(",") if isinstance(value, str) else value
    return [item.strip() for item in items if item.strip()]


def add_lora(
    model: nn.Module,
    r: int,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    parts: str | Sequence[str] = "decoder",
) -> list[str]:
    """
    Put LoRA adapters of rank `r` on the linear layers of the chosen pretrained `parts` of a vqa-fusion model, in
    place, and return the names of the adapted layers (e.g. `decoder.transformer.h.0.attn.c_attn`).

    Inside an adapted part only the adapters and the decoder's new cross-attention blocks train: every pretrained
    weight there is frozen. The fusion, and the parts without adapters, keep their `requires_grad` as it was (see
    `model.freeze`).

    Args:
        r: the adapters' rank, > 0.
        alpha: LoRA's alpha: the adapters' update is scaled by `alpha / r`.
        dropout: dropout on the adapters' input.
        target_modules: `"all-linear"` (every `nn.Linear` and GPT-2 `Conv1D` except the output layer: GPT-2's
            `c_attn`/`c_proj`/`c_fc`, Llama's and Qwen2's `q/k/v/o/gate/up/down_proj`, ...) or layer names (a
            comma-separated string or a list), each matching a layer whose name is it or ends with `.` + it.
            Cross-attention layers (names containing one of `CROSS_ATTENTION_MARKERS`) never get adapters.
        parts: a comma-separated string or a list of `decoder`, `question_encoder`, `vision_encoder`.
    """
    if r <= 0:
        raise ValueError(f"the LoRA rank must be positive, got {r}")
    part_names = _names(parts)
    unknown = [name for name in part_names if name not in LORA_PARTS]
    if unknown or not part_names:
        raise ValueError(f"unknown LoRA parts {parts!r}: use a comma-separated list of {', '.join(LORA_PARTS)}")
    all_linear = isinstance(target_modules, str) and target_modules.strip().lower() == ALL_LINEAR
    adapted = []
    for name in part_names:
        part = model.get_submodule(LORA_PARTS[name])
        if any(isinstance(module, BaseTunerLayer) for module in part.modules()):
            raise ValueError(f"the {name} has LoRA adapters already")
        has_cross_attention = any(_CROSS_ATTENTION.fullmatch(key) for key, _ in part.named_modules())
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=ALL_LINEAR if all_linear else _names(target_modules),
            exclude_modules=_CROSS_ATTENTION.pattern if has_cross_attention else None,
            fan_in_fan_out=any(isinstance(module, Conv1D) for module in part.modules()),
        )
        try:
            inject_adapter_in_model(config, part)
        except NoMatchingPeftModuleError as error:
            raise ValueError(f"LoRA target_modules {target_modules!r} match no layer of the {name}: {error}") from error
        # peft froze everything in the part but the adapters; the cross-attention is new, so it trains in full.
        for key, parameter in part.named_parameters():
            if any(marker in key for marker in CROSS_ATTENTION_MARKERS):
                parameter.requires_grad_(True)
        output = part.get_output_embeddings() if isinstance(part, PreTrainedModel) else None
        if isinstance(output, BaseTunerLayer) and output.get_base_layer().weight is part.get_input_embeddings().weight:
            raise ValueError(
                f"LoRA on the {name}'s output layer, which shares its weight with the input embeddings: merging would "
                "change both. Leave it out of target_modules."
            )
        adapted += [
            f"{LORA_PARTS[name]}.{key}" for key, module in part.named_modules() if isinstance(module, BaseTunerLayer)
        ]
    return adapted


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, adapters included, each shared (tied) tensor once."""
    parameters = list(model.parameters())
    return sum(p.numel() for p in parameters if p.requires_grad), sum(p.numel() for p in parameters)


def describe_trainable(model: nn.Module) -> str:
    """`"30,729,216 of 307,330,560 (10.00 %)"`: the trainable parameters, for the training log and the model card."""
    trainable, total = count_parameters(model)
    return f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f} %)"


def merge_lora(model: nn.Module) -> int:
    """
    Merge every LoRA adapter into the weight under it (`W += alpha / r * B @ A`, checked for NaN) and put the plain
    layer back, in place. Afterwards the model has the modules and state-dict keys of one that never had adapters,
    so `save_pretrained` writes a model that loads without peft. Returns the number of merged layers (0 without
    adapters). The merged weights keep `requires_grad=False`.
    """
    layers = [(key, module) for key, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for key, layer in layers:
        layer.merge(safe_merge=True)
        parent, _, child = key.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    for module in model.modules():
        # `inject_adapter_in_model` leaves its config on each adapted part.
        if "peft_config" in vars(module):
            del module.peft_config
    return len(layers)


def _saved_tensor_names(checkpoint: Path) -> set[str] | None:
    """The tensor names of a checkpoint saved as safetensors (one file or shards); None for other formats."""
    if (checkpoint / SAFE_WEIGHTS_NAME).is_file():
        with safe_open(checkpoint / SAFE_WEIGHTS_NAME, "pt") as weights:
            return set(weights.keys())
    if (checkpoint / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return set(json.loads((checkpoint / SAFE_WEIGHTS_INDEX_NAME).read_text())["weight_map"])
    return None


def check_checkpoint_adapters(model: nn.Module, checkpoint: str | Path | None) -> None:
    """
    Refuse to resume from a checkpoint whose LoRA adapters are not the model's: the Trainer would otherwise load it
    with a warning and train on, with the weights it could not place left at their start values.
    """
    if checkpoint is None:
        return
    saved = _saved_tensor_names(Path(checkpoint))
    if saved is None:
        return
    saved = {key for key in saved if ".lora_" in key}
    expected = {key for key in model.state_dict() if ".lora_" in key}
    if saved != expected:
        raise ValueError(
            f"{checkpoint} holds {len(saved)} LoRA tensors and the model {len(expected)}, not under the same names "
            f"(only in the checkpoint: {sorted(saved - expected)[:2]}, only in the model: {sorted(expected - saved)[:2]}"
            "), so the Trainer would resume without them. Resume with the --lora_* flags of the run that wrote it."
        )
