"""Configuration of vqa-fusion: a question encoder, a vision encoder and a causal decoder joined by fusion."""

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

try:
    from .backbones_vqa_fusion import vision_tower_config
except ImportError:
    from backbones_vqa_fusion import vision_tower_config

FUSION_MODES = ("sequence", "mean", "prefix")
# The fusions whose memory the decoder reads through cross-attention; "prefix" puts it into the decoder's input.
CROSS_ATTENTION_FUSIONS = ("sequence", "mean")

# Every Auto class a user may reach for resolves to the class that generates. `register_for_auto_class`
# records one class per object, so the others are written here and travel with every saved config.
AUTO_MAP = {
    "AutoConfig": "configuration_vqa_fusion.VqaFusionConfig",
    "AutoModel": "modeling_vqa_fusion.VqaFusionForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_vqa_fusion.VqaFusionForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_vqa_fusion.VqaFusionForConditionalGeneration",
}


class VqaFusionConfig(PreTrainedConfig):
    r"""
    Configuration of [`VqaFusionForConditionalGeneration`].

    Args:
        question_encoder (`PreTrainedConfig` or `dict`, *optional*):
            Any transformers text encoder (default: DistilBERT). Its token states encode the question.
        vision_encoder (`PreTrainedConfig` or `dict`, *optional*):
            Any vision model (default: ViT): one that returns a sequence (ViT, DeiT, BEiT, DINOv2, Swin) or a
            feature map (ResNet, ConvNeXt). A dual-encoder config (CLIP, SigLIP) is replaced by its
            `vision_config`: only the vision tower runs (without SigLIP's pooled-output head).
        decoder (`PreTrainedConfig` or `dict`, *optional*):
            Any causal LM (default: GPT-2). `is_decoder` is switched on, and `add_cross_attention` exactly for the
            cross-attention fusions; the model refuses a decoder that builds no cross-attention blocks for them
            (Llama, Qwen2 and most decoder-only LMs ignore the flag: use `fusion="prefix"`).
        fusion (`str`, *optional*, defaults to `"sequence"`):
            `"sequence"`: every projected question token and image token, tagged with a learned modality
            embedding, is a cross-attention key, so the decoder can attend to words and places; the mean
            projected question is added to the decoder's input embeddings, so its first query knows the question.
            `"mean"`: the book's method, one token `(mean question state + mean image state) / 2` after
            one linear projection per modality.
            `"prefix"`: the same tokens as `"sequence"` placed before the answer in the decoder's input
            embeddings (as LLaVA and nanoVLM do), so any decoder-only LM reads them with its own self-attention.
        fusion_layers (`int`, *optional*, defaults to 0):
            `"sequence"` and `"prefix"`: transformer layers (the decoder's head count, no dropout) over the joint
            question + image tokens, so that image tokens can read the question before the decoder reads them.
            Measured on the shapes demo: layers learn faster (the demo uses two); each costs about one vision layer.
        projection_dim (`int`, *optional*):
            Width of the fused tokens. It must equal the decoder's hidden size, which is what its cross-attention
            or its input embeddings take (`None`, the default, takes it from the decoder config).
        pad_token_id, bos_token_id, eos_token_id, decoder_start_token_id (`int`, *optional*):
            The decoder's token ids; unset ones are taken from the decoder config (GPT-2 has no pad token, so
            its EOS pads). Generated sequences start with `decoder_start_token_id` (default: BOS, or EOS for
            decoders without one, such as Qwen2).

    Example:
    ```python
    >>> from configuration_vqa_fusion import VqaFusionConfig
    >>> config = VqaFusionConfig(fusion="mean")
    >>> config.decoder.add_cross_attention
    True
    ```
    """

    model_type = "vqa_fusion"
    sub_configs_defaults = {
        "question_encoder": SubConfigSpec(config_class=AutoConfig, model_type="distilbert"),
        "vision_encoder": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "decoder": SubConfigSpec(
            config_class=AutoConfig, model_type="gpt2", init_kwargs={"is_decoder": True, "add_cross_attention": True}
        ),
    }

    question_encoder: PreTrainedConfig | dict | None = None
    vision_encoder: PreTrainedConfig | dict | None = None
    decoder: PreTrainedConfig | dict | None = None
    fusion: Literal["sequence", "mean", "prefix"] = "sequence"
    projection_dim: int | None = None
    fusion_layers: int = 0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {FUSION_MODES}, got {self.fusion!r}")
        if self.fusion_layers and self.fusion == "mean":
            raise ValueError(f"fusion_layers={self.fusion_layers} needs fusion='sequence' or 'prefix', got 'mean'")
        self.vision_encoder = vision_tower_config(self.vision_encoder)
        self.decoder.is_decoder = True
        self.decoder.add_cross_attention = self.fusion in CROSS_ATTENTION_FUSIONS
        decoder_width = self.decoder.hidden_size
        if self.projection_dim is None:
            self.projection_dim = decoder_width
        elif self.projection_dim != decoder_width:
            raise ValueError(
                f"projection_dim={self.projection_dim} but the decoder's hidden size is {decoder_width}: the fused "
                "tokens are read by its cross-attention or placed among its input embeddings, both of that "
                "width; leave projection_dim unset"
            )
        if self.eos_token_id is None:
            self.eos_token_id = self.decoder.eos_token_id
        if self.bos_token_id is None:
            self.bos_token_id = self.decoder.bos_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.decoder.pad_token_id if self.decoder.pad_token_id is not None else self.eos_token_id
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.bos_token_id if self.bos_token_id is not None else self.eos_token_id
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}


VqaFusionConfig.register_for_auto_class()

__all__ = ["CROSS_ATTENTION_FUSIONS", "FUSION_MODES", "VqaFusionConfig"]
