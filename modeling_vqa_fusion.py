"""vqa-fusion: a question encoder and a vision encoder, projected and fused into the cross-attention memory
of a causal decoder that generates the answer."""

from dataclasses import dataclass

import torch
from torch import nn

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput, Seq2SeqLMOutput

try:
    from .configuration_vqa_fusion import VqaFusionConfig
except ImportError:
    from configuration_vqa_fusion import VqaFusionConfig

# Decoder parameters whose names contain one of these belong to its cross-attention blocks (GPT-2:
# `crossattention`, `ln_cross_attn`; BART-like decoders: `encoder_attn`): they stay trainable under freeze("decoder").
CROSS_ATTENTION_MARKERS = ("crossattention", "cross_attn", "encoder_attn")
FREEZE_SPECS = ("none", "encoders", "question_encoder", "vision_encoder", "decoder", "all")
DEFAULT_MAX_NEW_TOKENS = 10


@dataclass
class VqaFusionEncoderOutput(ModelOutput):
    """
    The fused cross-attention memory. Every field has the batch first, so that `generate` expands them
    together for beam search.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, memory_length, projection_dim)`):
            The memory the decoder cross-attends to.
        attention_mask (`torch.LongTensor` of shape `(batch_size, memory_length)`):
            1 for memory positions to attend to, 0 for question padding.
        question_embedding (`torch.FloatTensor` of shape `(batch_size, projection_dim)`, *optional*):
            Added to every decoder input embedding (sequence fusion), so that the decoder's very first
            cross-attention query already depends on the question and can look for what it asks about.
    """

    last_hidden_state: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None
    question_embedding: torch.FloatTensor | None = None


FusionOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def _masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B, L, D)` states, `(B, L)` mask -> `(B, D)` mean over unmasked positions."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1)


class MeanFusion(nn.Module):
    """The book's fusion: mean question state (padding excluded) and mean image state (CLS included), each
    through one linear projection, averaged into a single memory token."""

    def __init__(self, question_dim: int, image_dim: int, dim: int):
        super().__init__()
        self.question_projection = nn.Linear(question_dim, dim)
        self.image_projection = nn.Linear(image_dim, dim)

    def forward(
        self, question_states: torch.Tensor, question_mask: torch.Tensor, image_states: torch.Tensor
    ) -> FusionOutput:
        """`(B, Lq, Dq)`, `(B, Lq)`, `(B, Li, Di)` -> memory `(B, 1, D)`, its mask `(B, 1)`, no question embedding."""
        question = self.question_projection(_masked_mean(question_states, question_mask))
        fused = (question + self.image_projection(image_states.mean(1))) / 2
        return fused.unsqueeze(1), question_mask.new_ones(question_mask.shape[0], 1), None


class SequenceFusion(nn.Module):
    """
    Every question token and image patch as its own memory position, projected and tagged with a learned
    modality embedding, optionally mixed by `layers` transformer layers so that patches can read the question
    (and words the image) before the decoder does. With layers, each patch also starts with the mean projected
    question added, so a layer's MLP can match every patch against the question directly, without first
    having to learn attention from patches to words (on the shapes demo: 64.7 % against 51.6 % after 1,000
    steps). The mean projected question is also returned, for the decoder's inputs. No normalisation of the
    memory: the encoders' outputs are layer-normed already, and a second norm was measured to slow learning
    several-fold on the shapes demo.
    """

    def __init__(self, question_dim: int, image_dim: int, dim: int, layers: int = 0, heads: int = 1):
        super().__init__()
        self.question_projection = nn.Linear(question_dim, dim)
        self.image_projection = nn.Linear(image_dim, dim)
        self.modality_embeddings = nn.Embedding(2, dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(layers)
        )

    def forward(
        self, question_states: torch.Tensor, question_mask: torch.Tensor, image_states: torch.Tensor
    ) -> FusionOutput:
        """`(B, Lq, Dq)`, `(B, Lq)`, `(B, Li, Di)` -> memory `(B, Lq + Li, D)`, its mask `(B, Lq + Li)` and the
        question embedding `(B, D)`."""
        question = self.question_projection(question_states)
        question_embedding = _masked_mean(question, question_mask)
        image = self.image_projection(image_states) + self.modality_embeddings.weight[1]
        if self.layers:
            image = image + question_embedding.unsqueeze(1)
        memory = torch.cat([question + self.modality_embeddings.weight[0], image], dim=1)
        mask = torch.cat([question_mask, question_mask.new_ones(image_states.shape[:2])], dim=1)
        for layer in self.layers:
            memory = layer(memory, src_key_padding_mask=mask == 0)
        return memory, mask, question_embedding


def _without_pooler(model: PreTrainedModel) -> PreTrainedModel:
    """Drop an encoder's pooler: its output is never used, and a parameter that never gets a gradient
    forces DDP's `find_unused_parameters`."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def _encode(encoder: nn.Module, **inputs) -> torch.Tensor:
    """Run an encoder, without building an autograd graph when all its parameters are frozen."""
    trainable = torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters())
    with torch.set_grad_enabled(trainable):
        return encoder(**inputs).last_hidden_state


class VqaFusionEncoder(nn.Module):
    """Question encoder + vision encoder + fusion: `(input_ids, attention_mask, pixel_values)` -> the decoder's
    cross-attention memory and its mask. This is what `generate` runs once per call."""

    main_input_name = "input_ids"

    def __init__(
        self,
        config: VqaFusionConfig,
        question_encoder: PreTrainedModel | None = None,
        vision_encoder: PreTrainedModel | None = None,
    ):
        super().__init__()
        self.config = config
        self.question_encoder = _without_pooler(question_encoder or AutoModel.from_config(config.question_encoder))
        self.vision_encoder = _without_pooler(vision_encoder or AutoModel.from_config(config.vision_encoder))
        dims = (config.question_encoder.hidden_size, config.vision_encoder.hidden_size, config.projection_dim)
        if config.fusion == "sequence":
            self.fusion = SequenceFusion(*dims, layers=config.fusion_layers, heads=config.decoder.num_attention_heads)
        else:
            self.fusion = MeanFusion(*dims)

    def check_inputs(self, input_ids: torch.Tensor | None, pixel_values: torch.Tensor | None) -> None:
        """Refuse inputs that would otherwise fail deep inside an encoder or give silently wrong answers."""
        if input_ids is None or pixel_values is None:
            missing = " and ".join(n for n, v in (("input_ids", input_ids), ("pixel_values", pixel_values)) if v is None)
            raise ValueError(f"{missing} must be given (or `encoder_outputs` from an earlier call)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
        vision = self.config.vision_encoder
        channels = vision.num_channels
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {channels}, height, width), got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating point tensor, got {pixel_values.dtype}")
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"batch sizes differ: input_ids has {input_ids.shape[0]} rows, pixel_values {pixel_values.shape[0]}"
            )
        size = getattr(vision, "image_size", None)
        if size is not None:
            expected = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            if tuple(pixel_values.shape[-2:]) != expected:
                raise ValueError(
                    f"pixel_values are {tuple(pixel_values.shape[-2:])} pixels but the vision encoder takes {expected}: "
                    "prepare images with the processor"
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
        image_states = _encode(self.vision_encoder, pixel_values=pixel_values)
        memory, memory_mask, question_embedding = self.fusion(question_states, attention_mask, image_states)
        return VqaFusionEncoderOutput(
            last_hidden_state=memory, attention_mask=memory_mask, question_embedding=question_embedding
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
    Visual question answering as conditional generation: the encoder fuses question and image into a memory,
    the decoder (GPT-2 by default) generates the answer through cross-attention.

    Labels are the answer tokens followed by EOS, padded with -100; the decoder input is the labels shifted
    right behind `decoder_start_token_id`, so `generate` returns rows that start with that token.
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
        A new model for fine-tuning from three pretrained parts (hub ids or local folders). The fusion and the
        decoder's cross-attention are freshly initialised, with std `initializer_range` (default: the decoder's
        own, 0.02 for gpt2); everything else keeps its pretrained weights. `kwargs` (e.g. `dtype`,
        `attn_implementation`, `revision`) are passed to every part's `from_pretrained`.
        """
        overrides = {}
        if initializer_range is not None:
            if not initializer_range > 0:
                raise ValueError(f"initializer_range must be positive, got {initializer_range}")
            overrides["initializer_range"] = initializer_range
        decoder_config = AutoConfig.from_pretrained(
            decoder, is_decoder=True, add_cross_attention=True, **overrides, **kwargs
        )
        parts = dict(
            question_encoder=AutoModel.from_pretrained(question_encoder, **kwargs),
            vision_encoder=AutoModel.from_pretrained(vision_encoder, **kwargs),
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
        (all of it except its cross-attention blocks and their layer norms), `all` (only the decoder's
        cross-attention and the fusion train), or a comma-separated list of these. The fusion always trains.
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
            encoder_outputs ([`VqaFusionEncoderOutput`], *optional*): a memory computed before; then the
                encoders are skipped (as in every step of `generate` after the first).
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
        loss = None
        if labels is not None:
            loss = self.answer_loss(decoder_outputs.logits, labels, num_items_in_batch)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=decoder_outputs.logits,
            cache=decoder_outputs.cache,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=memory,
        )

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
