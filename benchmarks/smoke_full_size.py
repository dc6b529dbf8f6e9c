"""Every supported backbone x decoder pairing at its real size, with random weights: one training forward and one
`generate` each, so that shape bugs at real sizes show up without a GPU or the hub. Not a test and not a
measurement (times are printed to size the run); it exits non-zero if any pairing fails.

The configs below are written out by hand from the checkpoints they stand for. The question encoder is
DistilBERT-base in every pairing. Cross-attention fusions (`sequence`, `mean`) run with GPT-2 only, the decoder
that has cross-attention; `prefix` runs with all three decoders.

    python benchmarks/smoke_full_size.py                      # all 6 x 5 pairings (a few minutes on CPU)
    python benchmarks/smoke_full_size.py --vision clip --decoder qwen2
"""

import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    ConvNextConfig,
    ConvNextImageProcessor,
    Dinov2Config,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    Qwen2Config,
    ResNetConfig,
    SiglipConfig,
    SiglipImageProcessor,
    ViTConfig,
    ViTImageProcessor,
)

import common  # noqa: E402
from backbones_vqa_fusion import vision_tower_config  # noqa: E402
from configuration_vqa_fusion import CROSS_ATTENTION_FUSIONS, FUSION_MODES, VqaFusionConfig  # noqa: E402
from modeling_vqa_fusion import VqaFusionForConditionalGeneration  # noqa: E402
from processing_vqa_fusion import VqaFusionProcessor  # noqa: E402
from tiny_components import train_decoder_tokenizer, train_question_tokenizer  # noqa: E402

VIT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
CENTER_CROP_224 = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})

# name: (config of the checkpoint, its image processor)
VISION = {
    "vit": (  # google/vit-base-patch16-224-in21k
        lambda: ViTConfig(**VIT_BASE, image_size=224, patch_size=16),
        lambda: ViTImageProcessor(size={"height": 224, "width": 224}),
    ),
    "clip": (  # openai/clip-vit-base-patch32, both towers
        lambda: CLIPConfig(
            text_config=dict(
                vocab_size=49408, hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                intermediate_size=2048, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
            ),
            vision_config=dict(**VIT_BASE, image_size=224, patch_size=32),
            projection_dim=512,
        ),
        lambda: CLIPImageProcessor(**CENTER_CROP_224),
    ),
    "siglip": (  # google/siglip-base-patch16-224, both towers
        lambda: SiglipConfig(
            text_config=dict(**VIT_BASE, vocab_size=32000, max_position_embeddings=64),
            vision_config=dict(**VIT_BASE, image_size=224, patch_size=16),
        ),
        lambda: SiglipImageProcessor(size={"height": 224, "width": 224}),
    ),
    "dinov2": (  # facebook/dinov2-small: 518-px position table, interpolated for 224-px crops
        lambda: Dinov2Config(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518, patch_size=14
        ),
        lambda: BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}),
    ),
    "convnext": (  # facebook/convnext-tiny-224
        lambda: ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
        lambda: ConvNextImageProcessor(size={"shortest_edge": 224}),
    ),
    "resnet": (  # microsoft/resnet-50
        lambda: ResNetConfig(
            embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3], layer_type="bottleneck"
        ),
        lambda: ConvNextImageProcessor(size={"shortest_edge": 224}),
    ),
}
# name: (config of the checkpoint, the kind of tokenizer it ships)
DECODERS = {
    "gpt2": (lambda: GPT2Config(), "gpt2"),  # gpt2, 124M
    "smollm2": (  # HuggingFaceTB/SmolLM2-135M, a Llama
        lambda: LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        ),
        "gpt2",
    ),
    "qwen2": (  # Qwen/Qwen2-0.5B
        lambda: Qwen2Config(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
        ),
        "qwen2",
    ),
}
QUESTIONS = ["What color is the bus?", "Is there a dog on the sofa next to the window?"]
ANSWERS = ["red", "yes"]


def fusions_for(decoder: str) -> list[str]:
    """Every fusion the decoder supports: all of them for GPT-2, `prefix` for decoder-only LMs."""
    if decoder == "gpt2":
        return list(FUSION_MODES)
    return [mode for mode in FUSION_MODES if mode not in CROSS_ATTENTION_FUSIONS]


def build_decoder(name: str, fusion: str) -> torch.nn.Module:
    """A random decoder at its real size, with cross-attention blocks for the cross-attention fusions."""
    config = DECODERS[name][0]()
    config.is_decoder, config.add_cross_attention = True, fusion in CROSS_ATTENTION_FUSIONS
    return AutoModelForCausalLM.from_config(config)


def run_pairing(
    vision: str, decoder: str, fusion: str, parts: dict[str, torch.nn.Module], processor: VqaFusionProcessor
) -> list[str]:
    """Build the model from the parts, run one training forward and one cached `generate`, check their shapes
    and the encoder's image layout; return the cells of its table row."""
    config = VqaFusionConfig(
        question_encoder=parts["question_encoder"].config.to_dict(),
        vision_encoder=VISION[vision][0](),
        decoder=parts["decoder"].config.to_dict(),
        fusion=fusion,
        fusion_layers=0 if fusion == "mean" else 1,
    )
    start = time.perf_counter()
    model = VqaFusionForConditionalGeneration(config, **parts)
    built = time.perf_counter() - start
    images = common.random_images(len(QUESTIONS), seed=1)
    batch = processor(images=images, text=QUESTIONS, answers=ANSWERS, return_tensors="pt")
    assert not batch["attention_mask"].all(), "the questions must differ in length"
    start = time.perf_counter()
    with torch.no_grad():
        output = model(**batch)
    forward = time.perf_counter() - start
    assert torch.isfinite(output.loss), output.loss
    assert output.logits.shape == (*batch["labels"].shape, model.decoder.config.vocab_size), output.logits.shape
    encoded = model.encoder(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    tokens = encoded.last_hidden_state.shape[1]
    if fusion != "mean":
        rows, columns = encoded.image_grid
        assert encoded.image_offset + rows * columns == tokens, (encoded.image_offset, encoded.image_grid, tokens)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    start = time.perf_counter()
    ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4)
    generated = time.perf_counter() - start
    assert ids.shape == (len(QUESTIONS), 5), ids.shape
    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    grid = "-" if fusion == "mean" else f"{encoded.image_grid[0]}x{encoded.image_grid[1]} at {encoded.image_offset}"
    times = [f"{built:.1f}", f"{forward:.2f}", f"{generated:.2f}"]
    return [vision, decoder, fusion, f"{parameters:.0f}M", str(tokens), grid, *times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision", nargs="*", default=list(VISION), choices=list(VISION))
    parser.add_argument("--decoder", nargs="*", default=list(DECODERS), choices=list(DECODERS))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wall = time.perf_counter()
    print(f"hardware: {common.hardware()}")
    question_encoder = AutoModel.from_config(DistilBertConfig())  # distilbert-base-uncased
    question_tokenizer = train_question_tokenizer(QUESTIONS)
    header = ["vision", "decoder", "fusion", "parameters", "fused tokens", "image grid"]
    header += ["build s", "forward s", "generate s"]
    print("| " + " | ".join(header) + " |\n|" + " --- |" * len(header), flush=True)
    failures, decoders = [], {}
    for vision in args.vision:
        vision_encoder = AutoModel.from_config(vision_tower_config(VISION[vision][0]()))
        for decoder in args.decoder:
            processor = VqaFusionProcessor(
                image_processor=VISION[vision][1](),
                tokenizer=train_decoder_tokenizer(ANSWERS, DECODERS[decoder][1]),
                question_tokenizer=question_tokenizer,
            )
            for fusion in fusions_for(decoder):
                cross = fusion in CROSS_ATTENTION_FUSIONS
                if (decoder, cross) not in decoders:
                    decoders[decoder, cross] = build_decoder(decoder, fusion)
                parts = dict(
                    question_encoder=question_encoder, vision_encoder=vision_encoder, decoder=decoders[decoder, cross]
                )
                try:
                    print("| " + " | ".join(run_pairing(vision, decoder, fusion, parts, processor)) + " |", flush=True)
                except Exception:  # report every failing pairing, then fail
                    failures.append(f"{vision} x {decoder} x {fusion}")
                    traceback.print_exc()
    minutes, seconds = divmod(round(time.perf_counter() - wall), 60)
    print(f"SUMMARY {len(failures)} failed: {', '.join(failures) or 'none'}; peak RSS "
          f"{common.peak_memory_mib(torch.device('cpu')) / 1024:.1f} GiB; wall {minutes} min {seconds} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
