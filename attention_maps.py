"""Where the decoder looked: answers with a heatmap over each image and a weight per question token.

`answer_with_attention(model, processor, images, questions)` generates the answers and reads, for each, the
decoder's attention from the answer tokens to the fused tokens (`VqaFusionEncoderOutput` says which positions
are question tokens and which are image grid cells):

- `sequence` fusion: the decoder's cross-attention over `[question tokens | image tokens]`;
- `prefix` fusion: the LM's self-attention from the answer positions back to the prefix (the answer's own
  earlier tokens take the rest of it);
- `mean` fusion: there is no attention over positions. The one fused token is the average of the mean projected
  question and the mean projected image, so every question token weighs `1 / (2 * tokens)`, the image `1 / 2`,
  and the map is flat: the image is one pooled cell, and the map says nothing about where the model looked.

The weights are averaged over the decoder's layers, its heads and the generation steps that produced the
answer's tokens (the step that ended it with EOS is left out, unless it was the only one). The grid weights,
normalised to sum to one, are upsampled bilinearly to the part of the image the image processor kept (the
whole image, or its centre where the processor crops) and normalised again: `heatmap` sums to one over the
image's pixels.

What it does not mean. Attention weights say which fused tokens the decoder's queries matched, not what caused
the answer: values pass through the attention after their own projection, a small weight on a large value can
matter more than a large weight on a small one, and heads and layers are averaged here with equal weight. With
fusion layers (`fusion_layers > 0`) every fused token has already read all the others, so "the token of cell
(r, c)" is only the token that started there. The vision encoder mixes its patches as well. Read a map as a
hint of where the decoder read, to be checked against the image, never as an explanation.
"""

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from modeling_vqa_fusion import VqaFusionEncoderOutput, VqaFusionForConditionalGeneration
from processing_vqa_fusion import VqaFusionProcessor


@dataclass
class AnswerAttention:
    """
    One answer and where the decoder read while generating it.

    Args:
        question: the question asked.
        answer: the generated answer (the best beam with beam search).
        alternatives: `(answer, probability)` for the top beams, best first; the probability is the model's of
            the whole answer, EOS included.
        heatmap (`np.ndarray` of shape `(height, width)` of the image): the attention on the image grid,
            upsampled to the image and normalised to sum to one.
        grid (`np.ndarray` of shape `(rows, columns)`): the same on the vision encoder's grid, summing to one.
        image_share: the part of all attention (question tokens, grid cells, CLS and registers and, with
            `prefix`, the answer's own tokens) that fell on the grid cells.
        question_tokens: the question encoder's tokens (special tokens included, padding excluded).
        question_weights (`np.ndarray` of shape `(len(question_tokens),)`): the part of all attention on each.
    """

    question: str
    answer: str
    alternatives: list[tuple[str, float]]
    heatmap: np.ndarray
    grid: np.ndarray
    image_share: float
    question_tokens: list[str]
    question_weights: np.ndarray


@contextlib.contextmanager
def eager_decoder_attention(model: VqaFusionForConditionalGeneration) -> Iterator[None]:
    """Run the decoder with eager attention: SDPA and flash attention compute no weights, and return empty
    attentions (GPT-2) or none at all (Llama, Qwen2) when asked for them. The setting is restored after."""
    before = model.decoder.config._attn_implementation
    if before != "eager":
        model.decoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            model.decoder.set_attn_implementation(before)


def answer_steps(sequences: torch.LongTensor, eos_token_id: int) -> torch.Tensor:
    """`(batch, length)` generated rows (start token first) -> `(batch, length)` mask of the decoder positions
    whose outputs were the answer's tokens: positions `0 .. n - 1` for an answer of `n` tokens before EOS,
    position 0 alone for an empty answer."""
    is_eos = sequences[:, 1:] == eos_token_id
    never_ended = torch.full_like(is_eos[:, 0], is_eos.shape[1], dtype=torch.long)
    steps = torch.where(is_eos.any(1), is_eos.int().argmax(1), never_ended)
    positions = torch.arange(sequences.shape[1], device=sequences.device)
    return positions[None, :] < steps.clamp(min=1)[:, None]


def answer_log_probabilities(logits: torch.Tensor, sequences: torch.LongTensor, eos_token_id: int) -> torch.Tensor:
    """`(batch, length, vocab)` teacher-forced logits of `(batch, length)` generated rows -> `(batch,)` log
    probability of each row's answer tokens and its first EOS (a row cut off without EOS: its tokens only)."""
    targets = sequences[:, 1:]
    log_probabilities = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    after_eos = (targets == eos_token_id).int().cumsum(1) - (targets == eos_token_id).int() > 0
    return log_probabilities.masked_fill(after_eos, 0.0).sum(1)


def decoder_attention(
    model: VqaFusionForConditionalGeneration,
    encoder_outputs: VqaFusionEncoderOutput,
    sequences: torch.LongTensor,
    question_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Teacher-forced decoding of generated rows with attention weights.

    Args:
        encoder_outputs: the fused tokens of the rows (`memory_length` positions).
        sequences (`torch.LongTensor` of shape `(batch_size, length)`): generated rows, start token first.
        question_mask (`torch.Tensor` of shape `(batch_size, question_length)`): the questions' padding mask.

    Returns:
        The attention of the answer steps on each fused token, averaged over layers, heads and the steps of
        `answer_steps`, `(batch_size, memory_length)`; and each row's answer log probability `(batch_size,)`.
        With `mean` fusion, the fused token's fixed averaging weights (see the module's docstring), spread back
        over `[question tokens | one image cell]` (`memory_length` = question length + 1).
    """
    eos = model.config.eos_token_id
    with eager_decoder_attention(model), torch.no_grad():
        output = model(encoder_outputs=encoder_outputs, decoder_input_ids=sequences, output_attentions=True)
    log_probabilities = answer_log_probabilities(output.logits, sequences, eos)
    steps = answer_steps(sequences, eos).to(output.logits.dtype)
    if model.config.fusion == "mean":
        return mean_fusion_weights(question_mask), log_probabilities
    if model.config.fusion == "prefix":
        prefix = encoder_outputs.attention_mask.shape[1]
        layers = torch.stack(output.decoder_attentions)[:, :, :, prefix:, :prefix]
    else:
        layers = torch.stack(output.cross_attentions)
    # (layers, batch, heads, steps, memory) -> (batch, steps, memory), then the mean over the answer's steps.
    per_step = layers.float().mean(dim=(0, 2))
    return (per_step * steps.unsqueeze(-1)).sum(1) / steps.sum(1, keepdim=True), log_probabilities


def mean_fusion_weights(question_mask: torch.Tensor) -> torch.Tensor:
    """`mean` fusion's averaging weights over `[question tokens | the pooled image]`, `(batch, question + 1)`:
    half on the question's unpadded tokens, equally, half on the image."""
    question = question_mask.float() / question_mask.sum(1, keepdim=True).clamp(min=1) / 2
    return torch.cat([question, question.new_full((question.shape[0], 1), 0.5)], dim=1)


def _size_field(size, name: str) -> int | None:
    """A field of an image processor's `size`/`crop_size`: a `SizeDict` (transformers 5) or a plain dict."""
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def processed_region(image_processor, height: int, width: int) -> tuple[float, float, float, float]:
    """
    `(top, left, bottom, right)` of the part of a `height` x `width` image that the image processor keeps, in
    the image's pixels. The whole image when it resizes to a fixed size or keeps the aspect ratio; the centre
    when it resizes the shortest edge and then crops (CLIP's and DINOv2's processors crop `crop_size`;
    ConvNeXt's, below 384 pixels, resizes to `shortest_edge / crop_pct` and crops `shortest_edge` square).
    """
    whole = (0.0, 0.0, float(height), float(width))
    shortest = _size_field(getattr(image_processor, "size", None) or {}, "shortest_edge")
    crop_pct = getattr(image_processor, "crop_pct", None)
    crop_size = getattr(image_processor, "crop_size", None)
    if shortest is None:
        return whole
    if crop_pct is not None:
        if shortest >= 384:
            return whole
        scale, crop = shortest / crop_pct / min(height, width), (shortest, shortest)
    elif getattr(image_processor, "do_center_crop", False) and crop_size is not None:
        scale = shortest / min(height, width)
        crop = (_size_field(crop_size, "height"), _size_field(crop_size, "width"))
    else:
        return whole
    crop_height, crop_width = min(crop[0] / scale, height), min(crop[1] / scale, width)
    top, left = (height - crop_height) / 2, (width - crop_width) / 2
    return top, left, top + crop_height, left + crop_width


def upsample(grid: np.ndarray, height: int, width: int, region: tuple[float, float, float, float]) -> np.ndarray:
    """`(rows, columns)` weights -> `(height, width)` weights summing to one: bilinear inside `region`, zero
    outside it."""
    top, left, bottom, right = (round(value) for value in region)
    grid = torch.from_numpy(grid)[None, None].float()
    size = (bottom - top, right - left)
    inside = torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    heatmap = np.zeros((height, width), dtype=np.float32)
    heatmap[top:bottom, left:right] = inside
    return heatmap / heatmap.sum()


def answer_with_attention(
    model: VqaFusionForConditionalGeneration,
    processor: VqaFusionProcessor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    num_alternatives: int = 1,
    **generate_kwargs,
) -> list[AnswerAttention]:
    """
    Answer `questions[i]` about `images[i]` and return, per question, the answer, its top `num_alternatives`
    beams with their probabilities, and where the decoder read (see `AnswerAttention` and the module's
    docstring). `generate_kwargs` go to `model.generate` (e.g. `num_beams`, `max_new_tokens`); with
    `num_alternatives > 1`, beam search with at least that many beams. The model runs as it is: in eval mode, as
    `from_pretrained` returns it, for maps without dropout.
    """
    if num_alternatives < 1:
        raise ValueError(f"num_alternatives must be at least 1, got {num_alternatives}")
    inputs = processor(images=list(images), text=list(questions), return_tensors="pt").to(model.device)
    if num_alternatives > 1:
        generate_kwargs["num_beams"] = max(generate_kwargs.get("num_beams", 1), num_alternatives)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(**inputs)
        sequences = model.generate(**inputs, num_return_sequences=num_alternatives, **generate_kwargs)
    expanded = VqaFusionEncoderOutput(
        **{
            name: value.repeat_interleave(num_alternatives, dim=0) if isinstance(value, torch.Tensor) else value
            for name, value in encoder_outputs.items()
        }
    )
    question_mask = inputs["attention_mask"].repeat_interleave(num_alternatives, dim=0)
    weights, log_probabilities = (t.cpu() for t in decoder_attention(model, expanded, sequences, question_mask))
    texts = processor.batch_decode(sequences)
    offset, grid_shape = encoder_outputs.image_offset, encoder_outputs.image_grid
    if model.config.fusion == "mean":
        offset, grid_shape = inputs["input_ids"].shape[1], (1, 1)
    if grid_shape is None:
        raise ValueError(
            f"the vision encoder {model.config.vision_encoder.model_type!r} returned tokens that fit no grid of the "
            "image's shape: there is no map to draw"
        )
    results = []
    for index, (image, question) in enumerate(zip(images, questions)):
        row = index * num_alternatives
        cells = weights[row, offset : offset + grid_shape[0] * grid_shape[1]]
        grid = (cells / cells.sum()).reshape(grid_shape).numpy()
        region = processed_region(processor.image_processor, image.height, image.width)
        length = int(inputs["attention_mask"][index].sum())
        question_ids = inputs["input_ids"][index, :length].tolist()
        probabilities = log_probabilities[row : row + num_alternatives].exp().tolist()
        results.append(
            AnswerAttention(
                question=question,
                answer=texts[row],
                alternatives=list(zip(texts[row : row + num_alternatives], probabilities)),
                heatmap=upsample(grid, image.height, image.width, region),
                grid=grid,
                image_share=float(cells.sum()),
                question_tokens=processor.question_tokenizer.convert_ids_to_tokens(question_ids),
                question_weights=weights[row, :length].numpy(),
            )
        )
    return results


__all__ = [
    "AnswerAttention",
    "answer_log_probabilities",
    "answer_steps",
    "answer_with_attention",
    "decoder_attention",
    "eager_decoder_attention",
    "processed_region",
    "upsample",
]
