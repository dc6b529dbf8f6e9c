"""The vqa-fusion processor: images + questions (+ answers) -> model inputs, and generated ids -> answers."""

import numpy as np
import torch
from PIL import Image, ImageOps

from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, BatchFeature, ProcessorMixin

DEFAULT_MAX_ANSWER_LENGTH = 16
# Background that transparent pixels are composited onto: what a viewer shows, unlike `convert("RGB")`,
# which exposes whatever colour the transparent pixels happen to store.
TRANSPARENT_BACKGROUND = (255, 255, 255)
# Modes with an alpha channel (premultiplied "La" is first converted to "LA", the only mode Pillow converts it to).
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")
# Modes whose transparency can be a colour key, `info["transparency"]` (a PNG tRNS chunk; a palette index for "P").
COLOUR_KEY_MODES = ("P", "1", "L", "RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """
    An RGB copy of any PIL image, upright: EXIF orientation applied, transparency (an alpha channel or a
    colour key) composited on white, and high bit-depth modes scaled to 8 bits instead of clipped (`I;16`, `I`
    as 16-bit, `F` as `[0, 1]` when its maximum is at most 1, else as `[0, 255]`).
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            values = values * 255.0 if np.nanmax(values, initial=0.0) <= 1.0 else values
        else:
            values = values / 257.0
        image = Image.fromarray(np.nan_to_num(values).clip(0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "La":
        image = image.convert("LA")
    elif image.mode in COLOUR_KEY_MODES and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, TRANSPARENT_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def answer_prefix(tokenizer) -> str:
    """
    What goes before an answer so that it is encoded as a word inside running text: `" "` for byte-level BPE
    tokenizers (GPT-2, SmolLM2, Qwen2), whose words carry their leading space (`"Ġred"`), and `""` for
    tokenizers that mark word starts themselves (SentencePiece-style Llama tokenizers: `"red"` is `"▁red"`, while
    `" red"` becomes `"▁", "▁red"` in legacy ones). Found by comparing how a word is tokenized alone and after
    another word.
    """
    context = tokenizer.tokenize("is")
    in_text = tokenizer.tokenize("is yes")
    if in_text[: len(context)] == context and tokenizer.tokenize("yes") == in_text[len(context) :]:
        return ""
    return " "


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class VqaFusionProcessor(ProcessorMixin):
    r"""
    Prepares vqa-fusion inputs: the vision encoder's image processor for `pixel_values`, the question encoder's
    tokenizer for `input_ids` and `attention_mask`, and the decoder's tokenizer (the primary `tokenizer`,
    which decodes answers) for `labels`.

    Args:
        image_processor: the vision encoder's image processor (e.g. `ViTImageProcessor`).
        tokenizer: the decoder's tokenizer (e.g. GPT-2's). Answers are encoded as words appear inside its
            training text (with a leading space for byte-level BPE such as GPT-2's, see `answer_prefix`) and
            followed by its EOS token, which also pads when it has no padding token.
        question_tokenizer: the question encoder's tokenizer (e.g. DistilBERT's); questions are truncated to
            its `model_max_length`.
        max_answer_length (`int`, defaults to 16): answer tokens kept in `labels`, EOS included.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        question_tokenizer=None,
        max_answer_length: int = DEFAULT_MAX_ANSWER_LENGTH,
        **kwargs,
    ):
        super().__init__(image_processor, tokenizer, question_tokenizer, **kwargs)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.answer_prefix = answer_prefix(self.tokenizer)
        if max_answer_length < 1:
            raise ValueError(f"max_answer_length must be at least 1 (room for EOS), got {max_answer_length}")
        self.max_answer_length = max_answer_length

    @classmethod
    def from_pretrained_components(
        cls, question_encoder: str, vision_encoder: str, decoder: str, **kwargs
    ) -> "VqaFusionProcessor":
        """
        A processor made of the three parts' own preprocessing (hub ids or local folders), for a model built
        with `VqaFusionForConditionalGeneration.from_pretrained_components` from the same parts. Questions are
        truncated to what the question encoder's position embeddings allow.
        """
        question_tokenizer = AutoTokenizer.from_pretrained(question_encoder, **kwargs)
        positions = getattr(AutoConfig.from_pretrained(question_encoder, **kwargs), "max_position_embeddings", None)
        if positions is not None and question_tokenizer.model_max_length > positions:
            question_tokenizer.model_max_length = positions
        return cls(
            image_processor=AutoImageProcessor.from_pretrained(vision_encoder, **kwargs),
            tokenizer=AutoTokenizer.from_pretrained(decoder, **kwargs),
            question_tokenizer=question_tokenizer,
        )

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        answers: str | list[str] | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """
        Args:
            images (`PIL.Image.Image` or a list of them): one image per question, any mode.
            text (`str` or `list[str]`): the questions.
            answers (`str` or `list[str]`, *optional*): target answers, for training; gives `labels`.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` `(batch, question_length)`, `pixel_values`
            `(batch, 3, height, width)` and, with answers, `labels` `(batch, answer_length)`: answer tokens and
            EOS, -100 where padded.
        """
        images, questions, answers = _as_list(images), _as_list(text), _as_list(answers)
        if not questions:
            raise ValueError("text (the questions) must be given")
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions: give one image per question")
        if answers and len(answers) != len(questions):
            raise ValueError(f"got {len(answers)} answers for {len(questions)} questions")
        for index, question in enumerate(questions):
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"text[{index}] is {question!r}: every question must be a non-empty string")
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(f"images[{index}] is {type(image).__name__}, expected a PIL image")
            if 0 in image.size:
                raise ValueError(f"images[{index}] is empty: {image.width}x{image.height} pixels")

        # Padding at the end of each question: the model's layout puts the question block first, padding last.
        encoding = self.question_tokenizer(
            questions,
            padding=True,
            padding_side="right",
            truncation=True,
            return_tensors=return_tensors,
            return_token_type_ids=False,
        )
        rgb_images = [to_rgb(image) for image in images]
        pixel_values = self.image_processor(rgb_images, return_tensors=return_tensors)["pixel_values"]
        data = {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"], "pixel_values": pixel_values}
        if answers:
            data["labels"] = self.encode_answers(answers)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def encode_answers(self, answers: list[str]) -> list[list[int]]:
        """Answer strings -> rows of token ids + EOS, truncated to `max_answer_length`, padded with -100."""
        rows = []
        for index, answer in enumerate(answers):
            if not isinstance(answer, str) or not answer.strip():
                raise ValueError(f"answers[{index}] is {answer!r}: every answer must be a non-empty string")
            ids = self.tokenizer(self.answer_prefix + answer.strip(), add_special_tokens=False)["input_ids"]
            rows.append(ids[: self.max_answer_length - 1] + [self.tokenizer.eos_token_id])
        width = max(len(row) for row in rows)
        return [row + [-100] * (width - len(row)) for row in rows]

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Generated ids `(batch, length)` -> answer strings; -100 (label padding) is read as padding."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        pad = self.tokenizer.pad_token_id
        rows = [[pad if token < 0 else token for token in row] for row in sequences]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)
        return [text.strip() for text in texts]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """What the `image-text-to-text` pipeline returns: the same clean answers as `batch_decode`."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


VqaFusionProcessor.register_for_auto_class()

__all__ = ["VqaFusionProcessor", "answer_prefix", "to_rgb"]
