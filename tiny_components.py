"""Tiny pretrained-style components built offline: random weights and tokenizers trained in a second.

They are saved as ordinary `save_pretrained` folders, so the demo and the tests load them through exactly the
code a user takes with hub ids (`from_pretrained_components("distilbert-base-uncased", ...)`).
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

EOS = "<|endoftext|>"


@dataclass
class TinySizes:
    """Widths and depths of the tiny components. One `hidden` for all three, as in the book (768 each).
    No dropout: these models start from random weights and train for minutes, not epochs."""

    hidden: int = 128
    heads: int = 4
    question_layers: int = 2
    vision_layers: int = 4
    decoder_layers: int = 2
    image_size: int = 64
    patch_size: int = 16
    max_question_length: int = 32
    max_answer_positions: int = 32


def _question_tokenizer(questions: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lowercasing WordPiece tokenizer with BERT's special tokens, like distilbert-base-uncased's. Its
    vocabulary is every word of the questions plus every character (alone and as `##` continuation), in
    sorted order: the same ids on every run (the `tokenizers` WordPiece trainer breaks ties differently
    from run to run, which made identical training runs differ)."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {word for question in questions for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(question))}
    characters = {character for word in words for character in word}
    pieces = sorted(words | characters | {"##" + character for character in characters})
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(special + pieces)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _decoder_tokenizer(answers: Iterable[str]) -> GPT2TokenizerFast:
    """A byte-level BPE tokenizer with GPT-2's single special token, trained on answers with a leading space
    (as the processor encodes them)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator((" " + answer for answer in answers), trainer)
    return GPT2TokenizerFast(tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def part_configs(
    sizes: TinySizes, question_vocab: int, decoder_vocab: int, question_pad_id: int, eos_id: int
) -> dict[str, PretrainedConfig]:
    """The three parts' configs at `sizes`: `{"question_encoder": DistilBertConfig, "vision_encoder":
    ViTConfig, "decoder": GPT2Config}`. Like `gpt2` on the Hub, the decoder has no cross-attention of its
    own: vqa-fusion adds it, freshly initialised."""
    return {
        "question_encoder": DistilBertConfig(
            vocab_size=question_vocab,
            dim=sizes.hidden,
            n_heads=sizes.heads,
            n_layers=sizes.question_layers,
            hidden_dim=4 * sizes.hidden,
            max_position_embeddings=sizes.max_question_length,
            pad_token_id=question_pad_id,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        "vision_encoder": ViTConfig(
            image_size=sizes.image_size,
            patch_size=sizes.patch_size,
            hidden_size=sizes.hidden,
            num_attention_heads=sizes.heads,
            num_hidden_layers=sizes.vision_layers,
            intermediate_size=4 * sizes.hidden,
        ),
        "decoder": GPT2Config(
            vocab_size=decoder_vocab,
            n_positions=sizes.max_answer_positions,
            n_embd=sizes.hidden,
            n_layer=sizes.decoder_layers,
            n_head=sizes.heads,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    }


def build_tiny_components(
    out_dir: str | Path, questions: Iterable[str], answers: Iterable[str], sizes: TinySizes | None = None
) -> dict[str, str]:
    """
    Save a tiny question encoder (DistilBERT), vision encoder (ViT) and decoder (GPT-2), each with its
    tokenizer or image processor, under `out_dir`; return their folders as
    `{"question_encoder": ..., "vision_encoder": ..., "decoder": ...}`.
    """
    sizes = sizes or TinySizes()
    out_dir = Path(out_dir)
    paths = {name: str(out_dir / name) for name in ("question_encoder", "vision_encoder", "decoder")}
    question_tokenizer = _question_tokenizer(questions)
    question_tokenizer.model_max_length = sizes.max_question_length
    decoder_tokenizer = _decoder_tokenizer(answers)
    configs = part_configs(
        sizes, len(question_tokenizer), len(decoder_tokenizer), question_tokenizer.pad_token_id,
        decoder_tokenizer.eos_token_id,
    )
    DistilBertModel(configs["question_encoder"]).save_pretrained(paths["question_encoder"])
    question_tokenizer.save_pretrained(paths["question_encoder"])
    ViTModel(configs["vision_encoder"]).save_pretrained(paths["vision_encoder"])
    ViTImageProcessor(size={"height": sizes.image_size, "width": sizes.image_size}).save_pretrained(
        paths["vision_encoder"]
    )
    GPT2LMHeadModel(configs["decoder"]).save_pretrained(paths["decoder"])
    decoder_tokenizer.save_pretrained(paths["decoder"])
    return paths
