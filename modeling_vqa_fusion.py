"""vqa-fusion: a question encoder and a vision encoder, projected and fused into tokens that a causal decoder
reads, through cross-attention or as a prefix of its input, to generate the answer."""

from dataclasses import dataclass

import torch
from torch import nn

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    EncoderDecoderCache,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput, Seq2SeqLMOutput

try:
    from .backbones_vqa_fusion import (
        CROSS_ATTENTION_MARKERS,
        fixed_image_size,
        image_tokens,
        load_vision_encoder,
        require_cross_attention,
        vision_width,
        without_pooler,
    )
    from .configuration_vqa_fusion import CROSS_ATTENTION_FUSIONS, VqaFusionConfig
    from .fusion_vqa_fusion import MeanFusion, SequenceFusion
except ImportError:
    from backbones_vqa_fusion import (
        CROSS_ATTENTION_MARKERS,
        fixed_image_size,
        image_tokens,
        load_vision_encoder,
        require_cross_attention,
        vision_width,
        without_pooler,
    )
    from configuration_vqa_fusion import CROSS_ATTENTION_FUSIONS, VqaFusionConfig
    from fusion_vqa_fusion import MeanFusion, SequenceFusion

FREEZE_SPECS = ("none", "encoders", "question_encoder", "vision_encoder", "decoder", "all")
DEFAULT_MAX_NEW_TOKENS = 10


@dataclass
class VqaFusionEncoderOutput(ModelOutput):
    """
    The fused tokens: the memory the decoder cross-attends to (`sequence`, `mean`), or the prefix placed before
    the answer in its input embeddings (`prefix`). Tensors have the batch first, so that `generate` expands
    them together for beam search.

    Layout (`sequence` and `prefix`): `[question tokens | image tokens]`. The question block holds the question
    encoder's tokens, padded at its end (mask 0). The image block holds the vision encoder's tokens in its own
    order: first those that are no grid cell (CLS, DeiT's distillation token, DINOv2's registers; none for
    SigLIP, Swin and feature maps), then the grid cells row by row, so that cell `(row, column)` of the
    `image_grid` `(rows, columns)` sits at position `image_offset + row * columns + column`. Feature maps
    (ResNet, ConvNeXt) are their `(rows, columns)` cells; Swin's grid is its last stage's. With `prefix` the
    decoder's self-attention keys are these positions followed by the answer tokens, so the same indices map
    its attention back onto the image. `mean` fuses everything into one token: no image positions.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, memory_length, projection_dim)`):
            The fused tokens.
        attention_mask (`torch.LongTensor` of shape `(batch_size, memory_length)`):
            1 for positions to attend to, 0 for question padding.
        question_embedding (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            The mean projected question. `sequence` adds it to every decoder input embedding, so that the
            decoder's very first cross-attention query already depends on the question.
        image_offset (`int`, *optional*): position of the image grid's first cell, as above.
        image_grid (`tuple[int, int]`, *optional*): `(rows, columns)` of the image grid; None for `mean`, or
            when a backbone's output length fits no grid of the image's shape.
    """

    last_hidden_state: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    question_embedding: torch.FloatTensor | None = None
    image_offset: int | None = None
    image_grid: tuple[int, int] | None = None


def _encode(encoder: nn.Module, **inputs) -> torch.Tensor:
    """Run an encoder, without building an autograd graph when all its parameters are frozen."""
    trainable = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
    with torch.set_grad_enabled(trainable):
        return encoder(**inputs).last_hidden_state


class VqaFusionEncoder(nn.Module):
    """Question encoder + vision encoder + fusion: `(input_ids, attention_mask, pixel_values)` -> the fused tokens
    the decoder reads and their mask. This is what `generate` runs once per call."""

    main_input_name = "input_ids"

    def __init__(
        self,
        config: VqaFusionConfig,
        question_encoder: PreTrainedModel | None = None,
        vision_encoder: PreTrainedModel | None = None,
    ):
        super().__init__()
        self.config = config
        self.question_encoder = without_pooler(question_encoder or AutoModel.from_config(config.question_encoder))
        self.vision_encoder = without_pooler(vision_encoder or AutoModel.from_config(config.vision_encoder))
        self.image_size = fixed_image_size(self.vision_encoder)
        dims = (config.question_encoder.hidden_size, vision_width(config.vision_encoder), config.projection_dim)
        if config.fusion == "mean":
            self.fusion = MeanFusion(*dims)
        else:
            self.fusion = SequenceFusion(*dims, layers=config.fusion_layers, heads=config.decoder.num_attention_heads)

    def check_inputs(self, input_ids: torch.Tensor | None, pixel_values: torch.Tensor | None) -> None:
        """Refuse inputs that would otherwise fail deep inside an encoder or give silently wrong answers."""
        if input_ids is None or pixel_values is None:
            missing = " and ".join(n for n, v in (("input_ids", input_ids), ("pixel_values", pixel_values)) if v is None)
            raise ValueError(f"{missing} must be given (or `encoder_outputs` from an earlier call)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
        channels = getattr(self.config.vision_encoder, "num_channels", None)
        if pixel_values.dim() != 4 or (channels is not None and pixel_values.shape[1] != channels):
            raise ValueError(
                f"pixel_values must have shape (batch, {channels or 'channels'}, height, width), got "
                f"{tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating point tensor, got {pixel_values.dtype}")
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"batch sizes differ: input_ids has {input_ids.shape[0]} rows, pixel_values {pixel_values.shape[0]}"
            )
        if self.image_size is not None and tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])} pixels but the vision encoder takes "
                f"{self.image_size}: prepare images with the processor"
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        **kwargs,
    ) -> VqaFusionEncoderOutput:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, question_length)`): question tokens.
            attention_mask (`torch.LongTensor` of shape `(batch_size, question_length)`): 0 marks padding.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, channels, height, width)`): images.
        """
        self.check_inputs(input_ids, pixel_values)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        question_states = _encode(self.question_encoder, input_ids=input_ids, attention_mask=attention_mask)
        image_states, leading, grid = image_tokens(
            _encode(self.vision_encoder, pixel_values=pixel_values), pixel_values.shape[-2:], self.config.vision_encoder
        )
        memory, memory_mask, question_embedding = self.fusion(question_states, attention_mask, image_states)
        keeps_tokens = self.config.fusion != "mean"
        return VqaFusionEncoderOutput(
            last_hidden_state=memory,
            attention_mask=memory_mask,
            question_embedding=question_embedding,
            image_offset=input_ids.shape[1] + leading if keeps_tokens and grid is not None else None,
            image_grid=grid if keeps_tokens else None,
        )


class VqaFusionPreTrainedModel(PreTrainedModel):
    config: VqaFusionConfig
    config_class = VqaFusionConfig
    base_model_prefix = "vqa_fusion"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        """Every weight vqa-fusion adds (projections, modality embeddings, fusion layers, the decoder's new
        cross-attention) starts at N(0, initializer_range), biases at zero, norms at one. Weights loaded from the
        pretrained parts are never touched. The fusion layers' attention keeps its in-projection as one parameter
        of `nn.MultiheadAttention`, which the generic initialisation would give PyTorch's own Xavier scale."""
        if isinstance(module, nn.MultiheadAttention):
            init.normal_(module.in_proj_weight, mean=0.0, std=self.config.get_text_config().initializer_range)
            init.zeros_(module.in_proj_bias)
        else:
            super()._init_weights(module)


class VqaFusionForConditionalGeneration(VqaFusionPreTrainedModel, GenerationMixin):
    """
    Visual question answering as conditional generation: the encoder fuses question and image into tokens, the
    decoder (GPT-2 by default, or any causal LM with `fusion="prefix"`) generates the answer from them.

    Labels are the answer tokens followed by EOS, padded with -100; the decoder input is the labels shifted
    right behind `decoder_start_token_id`, so `generate` returns rows that start with that token. With
    `fusion="prefix"` the fused tokens come first in the decoder's input and the loss covers the answer only.
    """

    def __init__(
        self,
        config: VqaFusionConfig,
        question_encoder: PreTrainedModel | None = None,
        vision_encoder: PreTrainedModel | None = None,
        decoder: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.encoder = VqaFusionEncoder(config, question_encoder, vision_encoder)
        self.decoder = decoder or AutoModelForCausalLM.from_config(config.decoder)
        if config.fusion in CROSS_ATTENTION_FUSIONS:
            require_cross_attention(self.decoder, config.fusion)
        # One config object per part, shared with the part itself, so that what is saved is what runs.
        for name, part in (
            ("question_encoder", self.encoder.question_encoder),
            ("vision_encoder", self.encoder.vision_encoder),
            ("decoder", self.decoder),
        ):
            getattr(config, name)._attn_implementation = part.config._attn_implementation
            part.config = getattr(config, name)
        self._no_split_modules = [
            module
            for part in (self.encoder.question_encoder, self.encoder.vision_encoder, self.decoder)
            for module in (part._no_split_modules or [])
        ]
        self.post_init()

    @classmethod
    def from_pretrained_components(
        cls,
        question_encoder: str,
        vision_encoder: str,
        decoder: str,
        *,
        fusion: str = "sequence",
        fusion_layers: int = 0,
        initializer_range: float | None = None,
        **kwargs,
    ) -> "VqaFusionForConditionalGeneration":
        """
        A new model for fine-tuning from three pretrained parts (hub ids or local folders): any text encoder, any
        vision model or dual-encoder checkpoint (CLIP, SigLIP: its vision tower), any causal LM. The fusion and
        the decoder's cross-attention are freshly initialised, with std `initializer_range` (default: the
        decoder's own, 0.02 for gpt2); everything else keeps its pretrained weights. `kwargs` (e.g. `dtype`,
        `attn_implementation`, `revision`) are passed to every part's `from_pretrained`. A cross-attention
        fusion with a decoder that has none raises before any weights are loaded.
        """
        overrides = {}
        if initializer_range is not None:
            if not initializer_range > 0:
                raise ValueError(f"initializer_range must be positive, got {initializer_range}")
            overrides["initializer_range"] = initializer_range
        decoder_config = AutoConfig.from_pretrained(
            decoder, is_decoder=True, add_cross_attention=fusion in CROSS_ATTENTION_FUSIONS, **overrides, **kwargs
        )
        if fusion in CROSS_ATTENTION_FUSIONS:
            with torch.device("meta"):
                require_cross_attention(AutoModelForCausalLM.from_config(decoder_config), fusion)
        parts = dict(
            question_encoder=AutoModel.from_pretrained(question_encoder, **kwargs),
            vision_encoder=load_vision_encoder(vision_encoder, **kwargs),
            decoder=AutoModelForCausalLM.from_pretrained(decoder, config=decoder_config, **kwargs),
        )
        # Sub-configs from dicts: building the composite config must not reset the parts' own attention setting.
        config = cls.config_class(
            **{name: part.config.to_dict() for name, part in parts.items()}, fusion=fusion, fusion_layers=fusion_layers
        )
        model = cls(config, **parts)
        model.generation_config = GenerationConfig.from_model_config(config)
        # A length limit, not `max_new_tokens`: `generate(max_length=...)` and `Seq2SeqTrainer`'s
        # `generation_max_length` override `max_length`, but `max_new_tokens` would win over both.
        model.generation_config.max_length = 1 + DEFAULT_MAX_NEW_TOKENS
        return model

    def get_encoder(self, modality: str | None = None) -> VqaFusionEncoder:
        return self.encoder

    def get_decoder(self) -> PreTrainedModel:
        return self.decoder

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.decoder.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_output_embeddings(value)

    def freeze(self, spec: str = "none") -> None:
        """
        Choose what trains. `spec` is one of `none`, `encoders`, `question_encoder`, `vision_encoder`, `decoder`
        (all of it except its cross-attention blocks and their layer norms; with `prefix` fusion, which adds none,
        the whole LM), `all` (only the decoder's cross-attention and the fusion train), or a comma-separated list
        of these. The fusion always trains.
        A frozen encoder builds no autograd graph, so it costs no activation memory.
        """
        names = [name.strip() for name in spec.split(",") if name.strip()]
        unknown = [name for name in names if name not in FREEZE_SPECS]
        if unknown or not names:
            raise ValueError(f"unknown freeze spec {spec!r}: use a comma-separated list of {', '.join(FREEZE_SPECS)}")
        names = set(names)
        frozen = {
            "question_encoder": bool(names & {"question_encoder", "encoders", "all"}),
            "vision_encoder": bool(names & {"vision_encoder", "encoders", "all"}),
            "decoder": bool(names & {"decoder", "all"}),
        }
        self.requires_grad_(True)
        self.encoder.question_encoder.requires_grad_(not frozen["question_encoder"])
        self.encoder.vision_encoder.requires_grad_(not frozen["vision_encoder"])
        for name, parameter in self.decoder.named_parameters():
            is_cross_attention = any(marker in name for marker in CROSS_ATTENTION_MARKERS)
            parameter.requires_grad_(not frozen["decoder"] or is_cross_attention)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: VqaFusionEncoderOutput | tuple | None = None,
        cache=None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, question_length)`): question tokens.
            attention_mask (`torch.LongTensor` of shape `(batch_size, question_length)`): question padding mask.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, channels, height, width)`): images.
            decoder_input_ids (`torch.LongTensor` of shape `(batch_size, answer_length)`, *optional*):
                Defaults to `labels` shifted right behind `decoder_start_token_id`; without labels, to the start
                token alone, so `logits` are the scores of the first answer token.
            decoder_attention_mask (`torch.LongTensor` of shape `(batch_size, answer_length)`, *optional*):
                0 for answer positions to ignore (default: none). With `prefix` fusion and a cache, it covers every
                answer token so far, as `generate` extends it.
            encoder_outputs ([`VqaFusionEncoderOutput`], *optional*): fused tokens computed before; then the
                encoders are skipped (as in every step of `generate` after the first).
            cache (`Cache`, *optional*): the decoder's key/value cache; `generate` passes an
                `EncoderDecoderCache`, whose self-attention part holds the prefix too with `prefix` fusion.
            labels (`torch.LongTensor` of shape `(batch_size, answer_length)`, *optional*):
                Answer tokens and EOS, -100 where padded. Gives `loss`, the mean cross-entropy per answer token
                (or the sum over `num_items_in_batch` tokens, as the Trainer asks for gradient accumulation).
        """
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        elif isinstance(encoder_outputs, (tuple, list)):
            encoder_outputs = VqaFusionEncoderOutput(*encoder_outputs)
        memory = encoder_outputs.last_hidden_state

        if labels is not None:
            if labels.shape[0] != memory.shape[0]:
                raise ValueError(f"batch sizes differ: labels has {labels.shape[0]} rows, the inputs {memory.shape[0]}")
            if decoder_input_ids is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
            # Teacher forcing reads the whole answer at once: a KV cache would only cost memory.
            use_cache = False
        elif decoder_input_ids is None:
            # No answer given: score the first answer token, as `generate`'s first step does.
            decoder_input_ids = torch.full(
                (memory.shape[0], 1), self.config.decoder_start_token_id, dtype=torch.long, device=memory.device
            )

        if self.config.fusion == "prefix":
            decoder_outputs, logits, cache = self._decode_after_prefix(
                encoder_outputs, decoder_input_ids, decoder_attention_mask, cache, use_cache, **kwargs
            )
        else:
            inputs_embeds = None
            if encoder_outputs.question_embedding is not None:
                inputs_embeds = self.get_input_embeddings()(decoder_input_ids)
                inputs_embeds = inputs_embeds + encoder_outputs.question_embedding.unsqueeze(1).to(inputs_embeds.dtype)
                decoder_input_ids = None
            decoder_outputs = self.decoder(
                input_ids=decoder_input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=decoder_attention_mask,
                encoder_hidden_states=memory,
                encoder_attention_mask=encoder_outputs.attention_mask,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            logits, cache = decoder_outputs.logits, decoder_outputs.cache
        loss = None
        if labels is not None:
            loss = self.answer_loss(logits, labels, num_items_in_batch)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=getattr(decoder_outputs, "cross_attentions", None),
            encoder_last_hidden_state=memory,
        )

    def _decode_after_prefix(
        self,
        encoder_outputs: VqaFusionEncoderOutput,
        decoder_input_ids: torch.LongTensor,
        decoder_attention_mask: torch.LongTensor | None,
        cache,
        use_cache: bool | None,
        **kwargs,
    ) -> tuple[ModelOutput, torch.Tensor, object]:
        """
        `prefix` fusion: the decoder reads `[fused tokens | answer tokens]` as input embeddings. On the first call
        of a generation (an empty cache) or without a cache, the fused tokens are prepended; later calls feed the
        new answer tokens only, the prefix being in the cache. Question padding inside the prefix is masked, and
        positions count unmasked tokens only (the cumulative sum of the mask), so that an answer does not depend
        on how long the other questions of the batch are.

        Returns the decoder's output, the logits of the `(batch, new tokens)` answer positions, and the cache to
        hand back to `generate` (the `EncoderDecoderCache` it gave, whose self-attention part the decoder filled).
        """
        prefix, prefix_mask = encoder_outputs.last_hidden_state, encoder_outputs.attention_mask
        decoder_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        seen = decoder_cache.get_seq_length() if decoder_cache is not None else 0
        new_tokens = decoder_input_ids.shape[1]
        inputs_embeds = self.get_input_embeddings()(decoder_input_ids)
        if seen == 0:
            inputs_embeds = torch.cat([prefix.to(inputs_embeds.dtype), inputs_embeds], dim=1)
        answer_length = seen + inputs_embeds.shape[1] - prefix.shape[1]
        if decoder_attention_mask is None:
            decoder_attention_mask = prefix_mask.new_ones(prefix_mask.shape[0], answer_length)
        elif decoder_attention_mask.shape != (prefix_mask.shape[0], answer_length):
            raise ValueError(
                f"decoder_attention_mask has shape {tuple(decoder_attention_mask.shape)}, but "
                f"{(prefix_mask.shape[0], answer_length)} answer tokens are decoded"
            )
        attention_mask = torch.cat([prefix_mask, decoder_attention_mask.to(prefix_mask.dtype)], dim=1)
        limit = getattr(self.config.decoder, "max_position_embeddings", None)
        if limit is not None and attention_mask.shape[1] > limit:
            raise ValueError(
                f"the prefix ({prefix.shape[1]} fused tokens) and {answer_length} answer tokens need "
                f"{attention_mask.shape[1]} positions, but the decoder has max_position_embeddings={limit}"
            )
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        if self.decoder._supports_logits_to_keep():
            kwargs["logits_to_keep"] = new_tokens
        outputs = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=decoder_cache,
            use_cache=use_cache,
            **kwargs,
        )
        return outputs, outputs.logits[:, -new_tokens:], cache if cache is not None else outputs.cache

    @staticmethod
    def answer_loss(
        logits: torch.Tensor, labels: torch.LongTensor, num_items_in_batch: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cross-entropy of `(B, L, V)` logits against `(B, L)` labels, averaged over non-padding tokens."""
        total = nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten().to(logits.device), ignore_index=-100, reduction="sum"
        )
        count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum().clamp(min=1)
        return total / count

    def prepare_decoder_input_ids_from_labels(self, labels: torch.LongTensor) -> torch.LongTensor:
        """`[a1, a2, EOS, -100]` -> `[start, a1, a2, EOS]`: teacher forcing input for the labels."""
        shifted = labels.new_full(labels.shape, self.config.pad_token_id)
        shifted[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, self.config.pad_token_id)
        shifted[:, 0] = self.config.decoder_start_token_id
        return shifted


VqaFusionForConditionalGeneration.register_for_auto_class("AutoModel")

__all__ = ["VqaFusionConfig", "VqaFusionForConditionalGeneration", "VqaFusionPreTrainedModel"]
