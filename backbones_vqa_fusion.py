"""How vqa-fusion reads its pretrained parts. Vision backbones: the vision half of dual-encoder checkpoints
(CLIP, SigLIP), output widths and the image size a backbone takes, read from its own config, and its output
turned into image tokens whose grid is known, whether it is a sequence (ViT, DeiT, BEiT, DINOv2, Swin, CLIP,
SigLIP) or a feature map (ResNet, ConvNeXt). Encoders: unused poolers dropped. Decoders: whether one has the
cross-attention blocks a cross-attention fusion needs."""

import copy
import inspect
import math

import torch
from torch import nn

from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel

# Decoder parameters whose names contain one of these belong to its cross-attention blocks (GPT-2:
# `crossattention`, `ln_cross_attn`; BART-like decoders: `encoder_attn`): they stay trainable under freeze("decoder").
CROSS_ATTENTION_MARKERS = ("crossattention", "cross_attn", "encoder_attn")
# Wavelengths of the 2D sine-cosine position embeddings grow geometrically up to this many grid cells.
MAX_WAVELENGTH = 10000.0


def vision_tower_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """
    The config of the vision model vqa-fusion runs: `config.vision_config` for a dual-encoder checkpoint (CLIP,
    SigLIP: text and vision towers in one config), else `config` itself. A pooled-output head that SigLIP towers
    build (`vision_use_head`) is switched off, in a copy: vqa-fusion reads the token states only, and a head that
    never gets a gradient costs memory and forces DDP's `find_unused_parameters`.
    """
    tower = getattr(config, "vision_config", None)
    if isinstance(tower, PreTrainedConfig):
        config = tower
    if getattr(config, "vision_use_head", False):
        config = copy.deepcopy(config)
        config.vision_use_head = False
    return config


def load_vision_encoder(name_or_path: str, **kwargs) -> PreTrainedModel:
    """
    The pretrained vision model of a hub id or folder. For a dual-encoder checkpoint this is its vision tower
    alone (e.g. `CLIPVisionModel` for `openai/clip-vit-base-patch32`) with the checkpoint's vision weights; a
    checkpoint whose vision weights are not found raises instead of leaving a randomly initialised tower.
    """
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    tower = vision_tower_config(config)
    model, info = AutoModel.from_pretrained(name_or_path, config=tower, output_loading_info=True, **kwargs)
    if tower.model_type != config.model_type and info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{name_or_path} is a {config.model_type} checkpoint, but its vision tower ({type(model).__name__}) did "
            f"not find {len(missing)} of its weights there (e.g. {missing[:3]}): give a vision model or a "
            "dual-encoder checkpoint such as CLIP or SigLIP"
        )
    return model


def vision_width(config: PreTrainedConfig) -> int:
    """Channels of the backbone's output: `hidden_sizes[-1]` for staged conv nets (ResNet, ConvNeXt: the last
    stage is the output), else `hidden_size` (ViT family, CLIP and SigLIP towers, Swin's last stage)."""
    stages = getattr(config, "hidden_sizes", None)
    if stages:
        return stages[-1]
    width = getattr(config, "hidden_size", None)
    if width is None:
        raise ValueError(
            f"cannot tell the output width of the vision encoder {config.model_type!r}: its config has neither "
            "`hidden_sizes` nor `hidden_size`"
        )
    return width


def _pair(value) -> tuple[int, int] | None:
    """`16` or `(16, 16)` or `[16, 16]` -> `(16, 16)`; anything else (e.g. one size per stage) -> None."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return tuple(value)
    return None


def fixed_image_size(model: PreTrainedModel) -> tuple[int, int] | None:
    """
    `(height, width)` when the backbone takes only its config's `image_size`, else None. A backbone with
    absolute position embeddings and an `interpolate_pos_encoding` switch (ViT, DeiT, CLIP, SigLIP) has them
    sized for `image_size`; DINOv2 interpolates them always, Swin and BEiT have none by default, and conv nets
    take any size.
    """
    size = _pair(getattr(model.config, "image_size", None))
    if size is None or "interpolate_pos_encoding" not in inspect.signature(model.forward).parameters:
        return None
    if not any("position_embedding" in name for name, _ in model.named_parameters()):
        return None
    return size


def grid_position_embeddings(height: int, width: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """
    Fixed 2D sine-cosine position embeddings `(height * width, dim)`, row by row, with `like`'s dtype and device:
    sines and cosines of the row in the first half of the channels, of the column in the second, at wavelengths
    from 2*pi to 2*pi*10,000 grid cells. Channels past a multiple of 4 stay zero.
    """
    quarter = dim // 4
    frequencies = MAX_WAVELENGTH ** (-torch.arange(quarter, device=like.device, dtype=torch.float32) / max(quarter, 1))
    rows = torch.arange(height, device=like.device, dtype=torch.float32).repeat_interleave(width)
    columns = torch.arange(width, device=like.device, dtype=torch.float32).repeat(height)
    angles = [rows[:, None] * frequencies, columns[:, None] * frequencies]
    embeddings = torch.cat([f(angle) for angle in angles for f in (torch.sin, torch.cos)], dim=1)
    embeddings = torch.nn.functional.pad(embeddings, (0, dim - 4 * quarter))
    return embeddings.to(like.dtype)


def _sequence_grid(length: int, image_size: tuple[int, int], patch_size) -> tuple[int, tuple[int, int] | None]:
    """
    How many leading tokens of a `length`-token sequence are not grid cells (CLS, DeiT's distillation token,
    DINOv2's registers), and the grid `(rows, columns)` of the rest. A patch embedding gives
    `image_size // patch_size` cells; a hierarchical backbone (Swin) returns only its last stage's cells, a grid
    with the image's aspect ratio. `(0, None)` when neither fits.
    """
    patch = _pair(patch_size)
    if patch is not None:
        rows, columns = image_size[0] // patch[0], image_size[1] // patch[1]
        if 0 < rows * columns <= length:
            return length - rows * columns, (rows, columns)
    rows = max(1, round(math.sqrt(length * image_size[0] / image_size[1])))
    if length % rows == 0:
        return 0, (rows, length // rows)
    return 0, None


def image_tokens(
    states: torch.Tensor, image_size: tuple[int, int], config: PreTrainedConfig
) -> tuple[torch.Tensor, int, tuple[int, int] | None]:
    """
    A backbone's `last_hidden_state` as image tokens `(batch, tokens, channels)`, with the number of leading
    tokens that are not grid cells and the grid `(rows, columns)` of the rest (row-major; None when unknown).

    - A sequence `(batch, length, channels)` (ViT family, Swin, CLIP, SigLIP) is kept as it is.
    - A feature map `(batch, channels, rows, columns)` (ResNet, ConvNeXt) is flattened row by row, with fixed 2D
      sine-cosine position embeddings added: the flattened cells carry no position of their own, and questions
      ask about places.
    """
    if states.dim() == 4:
        _, channels, rows, columns = states.shape
        tokens = states.flatten(2).transpose(1, 2)
        return tokens + grid_position_embeddings(rows, columns, channels, tokens), 0, (rows, columns)
    if states.dim() != 3:
        raise ValueError(
            f"the vision encoder returned states of shape {tuple(states.shape)}: expected a sequence "
            "(batch, length, channels) or a feature map (batch, channels, height, width)"
        )
    special, grid = _sequence_grid(states.shape[1], image_size, getattr(config, "patch_size", None))
    return states, special, grid


def without_pooler(model: PreTrainedModel) -> PreTrainedModel:
    """Drop an encoder's pooler that has parameters (BERT's, ViT's): its output is never used, and a parameter
    that never gets a gradient forces DDP's `find_unused_parameters`. Parameter-free poolers (ResNet's average
    pooling) stay: their models call them unconditionally."""
    pooler = getattr(model, "pooler", None)
    if pooler is not None and any(True for _ in pooler.parameters()):
        model.pooler = None
    return model


def require_cross_attention(decoder: nn.Module, fusion: str) -> None:
    """Refuse a decoder without cross-attention blocks for the cross-attention fusion `fusion`. Decoder-only
    LMs (Llama, Qwen2, Mistral, ...) accept `add_cross_attention=True` and silently ignore it, so the parameters
    are checked, not the flag: such a model would train without ever seeing the image or the question."""
    if not any(marker in name for name, _ in decoder.named_parameters() for marker in CROSS_ATTENTION_MARKERS):
        raise ValueError(
            f"fusion={fusion!r} needs a decoder with cross-attention, but {type(decoder).__name__} has no "
            "cross-attention blocks (it ignores add_cross_attention): use fusion=\"prefix\", which places the "
            "fused question and image tokens before the answer in the decoder's input embeddings"
        )


__all__ = [
    "CROSS_ATTENTION_MARKERS",
    "fixed_image_size",
    "grid_position_embeddings",
    "image_tokens",
    "load_vision_encoder",
    "require_cross_attention",
    "vision_tower_config",
    "vision_width",
    "without_pooler",
]
