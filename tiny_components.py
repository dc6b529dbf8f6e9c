"""Tiny pretrained-style components built offline: random weights and tokenizers trained in a second.

They are saved as ordinary `save_pretrained` folders, so the demo and the tests load them through exactly the
code a user takes with hub ids (`from_pretrained_components("distilbert-base-uncased", ...)`). Besides the
default DistilBERT + ViT + GPT-2, every kind of part vqa-fusion supports has a tiny stand-in: BERT; DINOv2 (with
or without registers), Swin, CLIP and SigLIP (whole dual-encoder checkpoints), ConvNeXt, ResNet; Llama (a
SentencePiece-style tokenizer, as Llama 2's) and Qwen2 (byte-level BPE without BOS, as Qwen2's).
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    ConvNextConfig,
    ConvNextImageProcessor,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    DistilBertConfig,
    GPT2Config,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Tokenizer,
    ResNetConfig,
    SiglipConfig,
    SiglipImageProcessor,
    SwinConfig,
    ViTConfig,
    ViTImageProcessor,
)

EOS = "<|endoftext|>"
LLAMA_SPECIAL = ("<unk>", "<s>", "</s>")
VISION_ENCODERS = ("vit", "dinov2", "dinov2-registers", "swin", "clip", "siglip", "convnext", "resnet")
QUESTION_ENCODERS = ("distilbert", "bert")
DECODERS = ("gpt2", "llama", "qwen2")
# The text tower of the tiny dual-encoder checkpoints: vqa-fusion never runs it, it only has to be there.
DUAL_TEXT_TOWER = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, bos_token_id=0,
    eos_token_id=1, pad_token_id=1,
)


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


def train_question_tokenizer(questions: Iterable[str]) -> PreTrainedTokenizerFast:
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


def _byte_level_bpe(answers: Iterable[str]) -> Tokenizer:
    """A byte-level BPE with GPT-2's single special token, trained on answers with a leading space (as the
    processor encodes them for byte-level tokenizers)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator((" " + answer for answer in answers), trainer)
    return tokenizer


def _vocab_and_merges(tokenizer: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A trained BPE's vocabulary and merges, as the transformers tokenizer classes take them."""
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def train_decoder_tokenizer(answers: Iterable[str], kind: str = "gpt2") -> PreTrainedTokenizerFast:
    """
    The decoder's tokenizer, trained on the answers:
    - `gpt2`: byte-level BPE, `<|endoftext|>` as BOS, EOS and UNK (GPT-2's; SmolLM2's works the same way);
    - `qwen2`: `Qwen2Tokenizer`, byte-level BPE with `<|endoftext|>` as EOS and padding, and no BOS;
    - `llama`: `LlamaTokenizer`, SentencePiece-style BPE that marks word starts with `▁` itself (`"red"` is
      `▁red`), with `<unk>`, `<s>`, `</s>` and no padding token, as Llama 2's. Its merges stay inside words.
    """
    if kind == "gpt2":
        return GPT2TokenizerFast(tokenizer_object=_byte_level_bpe(answers), bos_token=EOS, eos_token=EOS, unk_token=EOS)
    if kind == "qwen2":
        return Qwen2Tokenizer(*_vocab_and_merges(_byte_level_bpe(answers)))
    if kind != "llama":
        raise ValueError(f"unknown decoder {kind!r}: use one of {DECODERS}")
    tokenizer = Tokenizer(models.BPE(unk_token=LLAMA_SPECIAL[0], byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.train_from_iterator(answers, trainers.BpeTrainer(vocab_size=1000, special_tokens=list(LLAMA_SPECIAL)))
    return LlamaTokenizer(*_vocab_and_merges(tokenizer))


def vision_config(kind: str, sizes: TinySizes) -> PretrainedConfig:
    """
    The vision encoder's config: a ViT-family model, Swin or a conv net, or a whole dual-encoder CLIP / SigLIP
    config. Swin and the conv nets have as many stages as it takes to downsample by `sizes.patch_size` (a
    stride-4 stem, then 2x per stage: two stages for patch 8, three for 16), each twice as wide as the one
    before and the last `sizes.hidden` wide, so that every backbone sees the image on the same grid.
    """
    layers = sizes.vision_layers
    num_stages = (sizes.patch_size // 4).bit_length()
    if sizes.patch_size != 4 * 2 ** (num_stages - 1):
        raise ValueError(f"patch_size must be 4, 8, 16, 32, ... (a stride-4 stem, then 2x per stage), got {sizes.patch_size}")
    widths = [sizes.hidden >> (num_stages - 1 - stage) for stage in range(num_stages)]
    depths = [1] * (num_stages - 1) + [max(1, layers - num_stages + 1)]
    vit_like = dict(
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        hidden_size=sizes.hidden,
        num_attention_heads=sizes.heads,
        num_hidden_layers=layers,
    )
    stages = dict(hidden_sizes=widths, depths=depths)
    if kind == "vit":
        return ViTConfig(**vit_like, intermediate_size=4 * sizes.hidden)
    if kind == "dinov2":
        return Dinov2Config(**vit_like)
    if kind == "dinov2-registers":
        return Dinov2WithRegistersConfig(**vit_like, num_register_tokens=4)
    if kind == "swin":
        return SwinConfig(
            image_size=sizes.image_size,
            patch_size=4,
            embed_dim=widths[0],
            depths=depths,
            num_heads=[max(1, sizes.heads >> (num_stages - 1 - stage)) for stage in range(num_stages)],
            window_size=4,
        )
    if kind == "convnext":
        return ConvNextConfig(**stages, num_stages=num_stages)
    if kind == "resnet":
        return ResNetConfig(**stages, embedding_size=widths[0], layer_type="basic")
    tower = dict(**vit_like, intermediate_size=4 * sizes.hidden)
    if kind == "clip":
        return CLIPConfig(text_config=DUAL_TEXT_TOWER, vision_config=tower, projection_dim=sizes.hidden)
    if kind == "siglip":
        return SiglipConfig(text_config=DUAL_TEXT_TOWER, vision_config=tower)
    raise ValueError(f"unknown vision encoder {kind!r}: use one of {VISION_ENCODERS}")


def image_processor(kind: str, size: int):
    """The image processor each vision checkpoint ships, producing `size` x `size` pixels."""
    square = {"height": size, "width": size}
    if kind in ("vit", "swin"):
        return ViTImageProcessor(size=square)
    if kind in ("dinov2", "dinov2-registers"):
        return BitImageProcessor(size={"shortest_edge": size}, crop_size=square)
    if kind == "clip":
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size=square)
    if kind == "siglip":
        return SiglipImageProcessor(size=square)
    if kind in ("convnext", "resnet"):
        return ConvNextImageProcessor(size={"shortest_edge": size})
    raise ValueError(f"unknown vision encoder {kind!r}: use one of {VISION_ENCODERS}")


def question_config(kind: str, sizes: TinySizes, vocab: int, pad_id: int) -> PretrainedConfig:
    """The question encoder's config: DistilBERT or BERT, no dropout."""
    if kind == "distilbert":
        return DistilBertConfig(
            vocab_size=vocab,
            dim=sizes.hidden,
            n_heads=sizes.heads,
            n_layers=sizes.question_layers,
            hidden_dim=4 * sizes.hidden,
            max_position_embeddings=sizes.max_question_length,
            pad_token_id=pad_id,
            dropout=0.0,
            attention_dropout=0.0,
        )
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=sizes.hidden,
            num_attention_heads=sizes.heads,
            num_hidden_layers=sizes.question_layers,
            intermediate_size=4 * sizes.hidden,
            max_position_embeddings=sizes.max_question_length,
            pad_token_id=pad_id,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    raise ValueError(f"unknown question encoder {kind!r}: use one of {QUESTION_ENCODERS}")


def decoder_config(kind: str, sizes: TinySizes, vocab: int, eos_id: int, bos_id: int | None = None) -> PretrainedConfig:
    """
    The decoder's config. GPT-2 as `gpt2` on the Hub: no cross-attention of its own (vqa-fusion adds it), BOS =
    EOS, `sizes.max_answer_positions` learned positions (with `prefix` fusion they must hold the prefix too).
    Llama and Qwen2 as SmolLM2 and Qwen2-0.5B: grouped-query attention, tied embeddings, rotary positions.
    """
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab,
            n_positions=sizes.max_answer_positions,
            n_embd=sizes.hidden,
            n_layer=sizes.decoder_layers,
            n_head=sizes.heads,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    rotary = dict(
        vocab_size=vocab,
        hidden_size=sizes.hidden,
        intermediate_size=3 * sizes.hidden,
        num_hidden_layers=sizes.decoder_layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=max(1, sizes.heads // 2),
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
    )
    if kind == "llama":
        return LlamaConfig(**rotary)
    if kind == "qwen2":
        return Qwen2Config(**rotary)
    raise ValueError(f"unknown decoder {kind!r}: use one of {DECODERS}")


def part_configs(
    sizes: TinySizes,
    question_vocab: int,
    decoder_vocab: int,
    question_pad_id: int,
    eos_id: int,
    *,
    bos_id: int | None = None,
    vision: str = "vit",
    question: str = "distilbert",
    decoder: str = "gpt2",
) -> dict[str, PretrainedConfig]:
    """The three parts' configs at `sizes`: `{"question_encoder": ..., "vision_encoder": ..., "decoder": ...}`,
    DistilBERT + ViT + GPT-2 unless other kinds are named."""
    return {
        "question_encoder": question_config(question, sizes, question_vocab, question_pad_id),
        "vision_encoder": vision_config(vision, sizes),
        "decoder": decoder_config(decoder, sizes, decoder_vocab, eos_id, bos_id),
    }


def build_tiny_components(
    out_dir: str | Path,
    questions: Iterable[str],
    answers: Iterable[str],
    sizes: TinySizes | None = None,
    *,
    vision: str = "vit",
    question: str = "distilbert",
    decoder: str = "gpt2",
) -> dict[str, str]:
    """
    Save a tiny question encoder, vision encoder and decoder (DistilBERT, ViT and GPT-2 unless other kinds are
    named), each with its tokenizer or image processor, under `out_dir`; return their folders as
    `{"question_encoder": ..., "vision_encoder": ..., "decoder": ...}`. CLIP and SigLIP are saved whole, text
    tower included, as on the Hub.
    """
    sizes = sizes or TinySizes()
    out_dir = Path(out_dir)
    paths = {name: str(out_dir / name) for name in ("question_encoder", "vision_encoder", "decoder")}
    answers = list(answers)
    question_tokenizer = train_question_tokenizer(questions)
    question_tokenizer.model_max_length = sizes.max_question_length
    decoder_tokenizer = train_decoder_tokenizer(answers, decoder)
    configs = part_configs(
        sizes, len(question_tokenizer), len(decoder_tokenizer), question_tokenizer.pad_token_id,
        decoder_tokenizer.eos_token_id, bos_id=decoder_tokenizer.bos_token_id, vision=vision, question=question,
        decoder=decoder,
    )
    AutoModel.from_config(configs["question_encoder"]).save_pretrained(paths["question_encoder"])
    question_tokenizer.save_pretrained(paths["question_encoder"])
    AutoModel.from_config(configs["vision_encoder"]).save_pretrained(paths["vision_encoder"])
    image_processor(vision, sizes.image_size).save_pretrained(paths["vision_encoder"])
    AutoModelForCausalLM.from_config(configs["decoder"]).save_pretrained(paths["decoder"])
    decoder_tokenizer.save_pretrained(paths["decoder"])
    return paths
