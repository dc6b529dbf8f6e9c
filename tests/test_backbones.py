"""Every kind of part vqa-fusion supports, as tiny random checkpoints saved to folders and loaded through the
code path a user takes with hub ids: vision encoders with sequence outputs (ViT, DINOv2, Swin), feature maps
(ConvNeXt, ResNet) and dual-encoder checkpoints (CLIP, SigLIP); BERT and DistilBERT question encoders; GPT-2
(cross-attention and prefix), Llama and Qwen2 (prefix) decoders."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, CLIPModel

from backbones_vqa_fusion import image_tokens
from configuration_vqa_fusion import VqaFusionConfig
from conftest import ANSWERS, QUESTIONS, solid
from modeling_vqa_fusion import VqaFusionForConditionalGeneration
from processing_vqa_fusion import VqaFusionProcessor
from test_modeling import make_batch as make_modeling_batch
from test_modeling import overfit
from tiny_components import TinySizes, build_tiny_components

SIZES = TinySizes(
    hidden=32, heads=2, question_layers=1, vision_layers=1, decoder_layers=2, image_size=32, patch_size=8,
    max_answer_positions=64,
)
# A covering set: every vision encoder, question encoder, decoder and fusion appears, and every decoder with
# every fusion it supports. (vision, question, decoder, fusion, fusion_layers)
PAIRINGS = {
    "clip-bert-gpt2-sequence": ("clip", "bert", "gpt2", "sequence", 0),
    "convnext-distilbert-gpt2-mean": ("convnext", "distilbert", "gpt2", "mean", 0),
    "resnet-bert-gpt2-prefix": ("resnet", "bert", "gpt2", "prefix", 0),
    "siglip-distilbert-llama-prefix": ("siglip", "distilbert", "llama", "prefix", 0),
    "dinov2registers-bert-qwen2-prefix": ("dinov2-registers", "bert", "qwen2", "prefix", 0),
    "swin-distilbert-llama-prefix+layer": ("swin", "distilbert", "llama", "prefix", 1),
    "vit-bert-qwen2-prefix": ("vit", "bert", "qwen2", "prefix", 0),
}
# Questions of different lengths, so that batches pad some of them; the same question with different images.
EXAMPLES = [
    ((255, 0, 0), "What color is the square?", "red"),
    ((0, 255, 0), "What color?", "green"),
    ((0, 0, 255), "Is there a red circle?", "no"),
    ((255, 0, 0), "Is there a red circle in this picture?", "yes"),
    ((0, 0, 255), "How many triangles are there?", "3"),
    ((255, 255, 0), "What color is the square?", "a very long answer indeed"),
]
TARGETS = [answer for _, _, answer in EXAMPLES]


def make_batch(processor, examples=EXAMPLES, with_answers=True):
    return make_modeling_batch(processor, examples, with_answers)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, dict[str, str]]:
    """The saved parts of every pairing, by pairing name."""
    root = tmp_path_factory.mktemp("backbones")
    return {
        name: build_tiny_components(root / name, QUESTIONS, ANSWERS, SIZES, vision=v, question=q, decoder=d)
        for name, (v, q, d, _, _) in PAIRINGS.items()
    }


def build(parts: dict[str, str], fusion: str, fusion_layers: int = 0, **kwargs) -> VqaFusionForConditionalGeneration:
    torch.manual_seed(0)
    return VqaFusionForConditionalGeneration.from_pretrained_components(
        **parts, fusion=fusion, fusion_layers=fusion_layers, **kwargs
    )


@pytest.fixture(scope="module")
def trained(folders) -> dict[str, tuple]:
    """Every pairing overfitted on EXAMPLES: `(model, processor, losses)` by pairing name."""
    result = {}
    for name, (_, _, _, fusion, layers) in PAIRINGS.items():
        model = build(folders[name], fusion, layers)
        processor = VqaFusionProcessor.from_pretrained_components(**folders[name])
        losses = overfit(model, make_batch(processor), steps=100)
        result[name] = (model.eval(), processor, losses)
    return result


def answers(model, processor, examples=EXAMPLES, **kwargs) -> list[str]:
    ids = model.generate(**make_batch(processor, examples, with_answers=False), max_new_tokens=8, **kwargs)
    return processor.batch_decode(ids)


@pytest.mark.parametrize("name", PAIRINGS)
def test_learns_the_batch(trained, name):
    model, processor, losses = trained[name]
    assert losses[-1] < 0.05 * losses[0]
    assert answers(model, processor) == TARGETS


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("name", PAIRINGS)
def test_cached_and_uncached_generation_identical(trained, name, num_beams):
    model, processor, _ = trained[name]
    inputs = make_batch(processor, with_answers=False)
    settings = dict(max_new_tokens=8, num_beams=num_beams, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, **settings, use_cache=True)
    uncached = model.generate(**inputs, **settings, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (with_cache, without) in enumerate(zip(cached.scores, uncached.scores)):
        torch.testing.assert_close(with_cache, without, rtol=1e-4, atol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("name", PAIRINGS)
def test_batched_generation_matches_one_by_one(trained, name):
    model, processor, _ = trained[name]
    assert not make_batch(processor)["attention_mask"].all(), "the batch must pad some questions"
    one_by_one = [answers(model, processor, [example])[0] for example in EXAMPLES]
    assert answers(model, processor) == one_by_one == TARGETS


def test_prefix_generation_runs_the_encoder_once(trained):
    model, processor, _ = trained["siglip-distilbert-llama-prefix"]
    calls = []
    handle = model.encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        answers(model, processor, num_beams=2)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_prefix_loss_is_the_language_models_own_loss_on_the_answer_only(trained):
    """The decoder's own causal-LM loss on `[fused tokens | start | answer]` with the prefix and the start token
    labelled -100 is the model's loss: the fused tokens sit right before the answer, and only the answer
    tokens and EOS count."""
    model, processor, _ = trained["vit-bert-qwen2-prefix"]
    examples = [example for example in EXAMPLES if example[1] == "What color is the square?"]
    batch = make_batch(processor, examples)
    assert batch["attention_mask"].all(), "same-length questions: the language model's default positions apply"
    labels = batch["labels"]
    with torch.no_grad():
        prefix = model.encoder(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")})
        prefix = prefix.last_hidden_state
        start = torch.full((len(examples), 1), model.config.decoder_start_token_id)
        answer_ids = torch.cat([start, labels.clamp(min=0)], dim=1)
        embeddings = torch.cat([prefix, model.decoder.get_input_embeddings()(answer_ids)], dim=1)
        lm_labels = torch.cat([torch.full((len(examples), prefix.shape[1] + 1), -100), labels], dim=1)
        reference = model.decoder(inputs_embeds=embeddings, labels=lm_labels).loss
        ours = model(**batch)
    assert ours.logits.shape[:2] == labels.shape
    torch.testing.assert_close(ours.loss, reference, rtol=1e-5, atol=1e-6)


def test_saved_folders_answer_the_same_in_a_fresh_process(trained, tmp_path):
    """Each pairing saved, then loaded with `AutoModel` / `AutoProcessor` and the `image-text-to-text` pipeline
    in one fresh process from another directory, with nothing of this repository importable."""
    expected = {}
    for name, (model, processor, _) in trained.items():
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
        inputs = make_batch(processor, with_answers=False)
        expected[name] = model.generate(**inputs, max_new_tokens=8).tolist()
    examples = [[list(color), question] for color, question, _ in EXAMPLES]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path), json.dumps(list(PAIRINGS)), json.dumps(examples)],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    result = json.loads(line[len("RESULT"):])
    for name in PAIRINGS:
        assert result[name]["generate"] == expected[name], name
        assert result[name]["pipeline"] == TARGETS, name


LOADER = """
import json, sys
from pathlib import Path
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline
root, names, examples = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
assert not any(name in sys.modules for name in ("modeling_vqa_fusion", "backbones_vqa_fusion"))
images = [Image.new("RGB", (40, 30), tuple(color)) for color, _ in examples]
questions = [question for _, question in examples]
result = {}
for name in names:
    folder = str(root / name)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    ids = model.generate(**processor(images=images, text=questions, return_tensors="pt"), max_new_tokens=8)
    vqa = pipeline("image-text-to-text", model=folder, trust_remote_code=True, return_full_text=False)
    answers = [vqa(images=image, text=question, max_new_tokens=8)[0]["generated_text"]
               for image, question in zip(images, questions)]
    result[name] = {"generate": ids.tolist(), "pipeline": answers}
print("RESULT" + json.dumps(result))
"""


@pytest.mark.parametrize("decoder", ["llama", "qwen2"])
@pytest.mark.parametrize("fusion", ["sequence", "mean"])
def test_cross_attention_fusion_with_a_decoder_only_lm_raises(folders, decoder, fusion):
    name = {"llama": "siglip-distilbert-llama-prefix", "qwen2": "vit-bert-qwen2-prefix"}[decoder]
    with pytest.raises(ValueError, match=f'fusion={fusion!r} needs a decoder with cross-attention.*fusion="prefix"'):
        build(folders[name], fusion)
    parts = {part: AutoConfig.from_pretrained(path) for part, path in folders[name].items()}
    with pytest.raises(ValueError, match='fusion="prefix"'):
        VqaFusionForConditionalGeneration(VqaFusionConfig(**parts, fusion=fusion))


@pytest.mark.parametrize(
    "name, tower",
    [("clip-bert-gpt2-sequence", "CLIPVisionModel"), ("siglip-distilbert-llama-prefix", "SiglipVisionModel")],
)
def test_dual_checkpoint_gives_its_pretrained_vision_tower_and_image_processor(folders, name, tower):
    vision = build(folders[name], PAIRINGS[name][3]).encoder.vision_encoder
    processor = VqaFusionProcessor.from_pretrained_components(**folders[name])
    assert type(vision).__name__ == tower
    assert not [n for n, _ in vision.named_parameters() if n.startswith("head.")], "SigLIP's pooled head is unused"
    dual = AutoModel.from_pretrained(folders[name]["vision_encoder"])
    theirs = {key.removeprefix("vision_model."): value for key, value in dual.state_dict().items()}
    ours = vision.state_dict()
    assert len(ours) > 10
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    assert type(processor.image_processor).__name__.startswith(tower.replace("VisionModel", "ImageProcessor"))
    assert make_batch(processor)["pixel_values"].shape[-2:] == (SIZES.image_size, SIZES.image_size)


def test_dual_checkpoint_without_vision_weights_raises(folders, tmp_path):
    """A checkpoint whose config has a vision tower but whose weights are stored under other names must not
    give a randomly initialised tower."""
    source = folders["clip-bert-gpt2-sequence"]["vision_encoder"]
    CLIPModel.from_pretrained(source).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({key.replace("vision_model.", "tower."): value for key, value in weights.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    parts = {**folders["clip-bert-gpt2-sequence"], "vision_encoder": str(tmp_path)}
    with pytest.raises(ValueError, match="vision tower .* did not find"):
        build(parts, "sequence")


def encoder_output(model, processor, pixel_values=None):
    batch = make_batch(processor, with_answers=False)
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
    with torch.no_grad():
        return model.encoder(**batch), batch["input_ids"].shape[1]


# Tokens before the grid and the grid at 32 px, from each architecture: patch 8 -> 4 x 4 cells; Swin's patch 4
# and one 2x merge -> 4 x 4; ConvNeXt's stride-4 stem and ResNet's stride-2 stem + pooling, then one stride-2 stage.
LAYOUTS = {
    "clip-bert-gpt2-sequence": (1, (4, 4)),
    "resnet-bert-gpt2-prefix": (0, (4, 4)),
    "siglip-distilbert-llama-prefix": (0, (4, 4)),
    "dinov2registers-bert-qwen2-prefix": (1 + 4, (4, 4)),
    "swin-distilbert-llama-prefix+layer": (0, (4, 4)),
    "vit-bert-qwen2-prefix": (1, (4, 4)),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_encoder_output_says_where_the_image_grid_is(trained, name):
    model, processor, _ = trained[name]
    output, question_length = encoder_output(model, processor)
    leading, grid = LAYOUTS[name]
    assert output.image_offset == question_length + leading
    assert output.image_grid == grid
    assert output.last_hidden_state.shape[1] == output.image_offset + grid[0] * grid[1], "the grid ends the tokens"


def test_mean_fusion_has_no_image_positions(trained):
    output, _ = encoder_output(*trained["convnext-distilbert-gpt2-mean"][:2])
    assert output.last_hidden_state.shape[1] == 1 and output.image_offset is None and output.image_grid is None


def test_dinov2_without_registers_has_one_leading_token(folders, tmp_path):
    parts = build_tiny_components(tmp_path, QUESTIONS, ANSWERS, SIZES, vision="dinov2")
    model = build({**folders["vit-bert-qwen2-prefix"], "vision_encoder": parts["vision_encoder"]}, "prefix")
    output, question_length = encoder_output(model, VqaFusionProcessor.from_pretrained_components(**parts))
    assert (output.image_offset, output.image_grid) == (question_length + 1, (4, 4))


@pytest.mark.parametrize(
    "name, grid", [("resnet-bert-gpt2-prefix", (4, 6)), ("swin-distilbert-llama-prefix+layer", (4, 6))]
)
def test_backbones_without_a_fixed_size_take_other_sizes_and_keep_the_aspect_ratio(trained, name, grid):
    model, processor, _ = trained[name]
    output, question_length = encoder_output(model, processor, torch.randn(len(EXAMPLES), 3, 32, 48))
    assert (output.image_offset, output.image_grid) == (question_length, grid)


@pytest.mark.parametrize("name", ["clip-bert-gpt2-sequence", "siglip-distilbert-llama-prefix", "vit-bert-qwen2-prefix"])
def test_backbones_with_a_fixed_size_refuse_others(trained, name):
    model, processor, _ = trained[name]
    with pytest.raises(ValueError, match=r"\(32, 48\) pixels but the vision encoder takes \(32, 32\)"):
        encoder_output(model, processor, torch.randn(len(EXAMPLES), 3, 32, 48))


def test_channels_are_checked_against_the_backbones_config(trained):
    model, processor, _ = trained["convnext-distilbert-gpt2-mean"]
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, height, width\)"):
        encoder_output(model, processor, torch.randn(len(EXAMPLES), 1, 32, 32))


def test_feature_map_cells_get_distinct_2d_positions():
    """A flattened feature map carries no position: a constant map must come out as distinct tokens, one per
    cell, while a sequence output is left as it is."""
    tokens, leading, grid = image_tokens(torch.zeros(2, 12, 3, 5), (30, 50), AutoConfig.for_model("resnet"))
    assert tokens.shape == (2, 15, 12) and leading == 0 and grid == (3, 5)
    assert len({tuple(row.tolist()) for row in tokens[0]}) == 15
    sequence = torch.randn(2, 17, 12)
    kept, leading, grid = image_tokens(sequence, (32, 32), AutoConfig.for_model("vit", patch_size=8))
    assert kept is sequence and leading == 1 and grid == (4, 4)


def test_prefix_freeze_decoder_freezes_the_whole_language_model(folders):
    parts = folders["siglip-distilbert-llama-prefix"]
    model = build(parts, "prefix")
    model.freeze("decoder")
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    model(**make_batch(VqaFusionProcessor.from_pretrained_components(**parts))).loss.backward()
    assert all(p.grad is not None for p in model.encoder.fusion.parameters())


def test_prefix_fusion_weights_are_new_at_initializer_range_and_the_lm_is_untouched(folders):
    parts = folders["vit-bert-qwen2-prefix"]
    model = build(parts, "prefix", initializer_range=0.1)
    pretrained = AutoModelForCausalLM.from_pretrained(parts["decoder"]).state_dict()
    ours = model.decoder.state_dict()
    assert ours.keys() == pretrained.keys()
    for key, value in pretrained.items():
        assert torch.equal(ours[key], value), key
    for name in ("question_projection", "image_projection"):
        weight = getattr(model.encoder.fusion, name).weight
        assert weight.std().item() == pytest.approx(0.1, rel=0.1), name


def legacy_sentencepiece_folder(llama_folder: str, out) -> str:
    """The tiny Llama tokenizer as older Llama checkpoints store it: no pre-tokenizer, a normalizer that
    prepends `▁` and turns spaces into `▁` (so `" red"` becomes `"▁▁red"`)."""
    from tokenizers import Tokenizer, decoders, normalizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    modern = AutoTokenizer.from_pretrained(llama_folder)
    tokenizer = Tokenizer.from_str(modern.backend_tokenizer.to_str())
    tokenizer.pre_tokenizer = None
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    legacy = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert legacy.tokenize(" red") == ["▁", "▁red"], "a leading space must be wrong for this tokenizer"
    legacy.save_pretrained(out)
    return str(out)


@pytest.mark.parametrize(
    "name, word_start, legacy",
    [
        ("clip-bert-gpt2-sequence", "Ġ", False),
        ("vit-bert-qwen2-prefix", "Ġ", False),
        ("siglip-distilbert-llama-prefix", "▁", False),
        ("siglip-distilbert-llama-prefix", "▁", True),
    ],
    ids=["gpt2", "qwen2", "llama", "llama-legacy"],
)
def test_answers_are_encoded_as_words_by_every_decoder_tokenizer(folders, tmp_path, name, word_start, legacy):
    """Answers are tokenized as they are inside running text, after another word (`Ġred` for byte-level BPE,
    `▁red` for SentencePiece-style tokenizers, never a lone `▁`), end with EOS, and decode back; a tokenizer
    without a padding token pads with EOS."""
    parts = dict(folders[name])
    if legacy:
        parts["decoder"] = legacy_sentencepiece_folder(parts["decoder"], tmp_path)
    processor = VqaFusionProcessor.from_pretrained_components(**parts)
    tokenizer = processor.tokenizer
    labels = make_batch(processor)["labels"]
    context = tokenizer.tokenize("is")
    for row, answer in zip(labels.tolist(), TARGETS):
        ids = [token for token in row if token != -100]
        assert ids[-1] == tokenizer.eos_token_id
        in_text = tokenizer.tokenize(f"is {answer}")
        assert tokenizer.convert_ids_to_tokens(ids[:-1]) == in_text[len(context):], answer
        assert processor.batch_decode([row]) == [answer]
    red = [token for token in labels[0].tolist() if token != -100]
    assert tokenizer.convert_ids_to_tokens(red[:-1]) == [word_start + "red"]
    assert tokenizer.pad_token_id is not None
    if tokenizer.eos_token == "</s>":
        assert tokenizer.pad_token == "</s>", "Llama's tokenizer has no padding token: EOS pads"


def test_gpt2_with_prefix_fusion_has_no_unused_cross_attention(folders):
    """GPT-2 builds cross-attention blocks when asked to: with `prefix` fusion they would never get a gradient
    (DDP then needs `find_unused_parameters`). ResNet, BERT without its pooler and GPT-2 use every parameter."""
    parts = folders["resnet-bert-gpt2-prefix"]
    model = build(parts, "prefix")
    model(**make_batch(VqaFusionProcessor.from_pretrained_components(**parts))).loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    rebuilt = VqaFusionForConditionalGeneration(model.config)  # as `from_pretrained` builds it
    assert rebuilt.state_dict().keys() == model.state_dict().keys()


def test_seq2seq_trainer_predicts_with_generate_for_prefix_fusion(trained, tmp_path):
    """`Seq2SeqTrainer` evaluates a prefix-fusion model as any other: its loss on the labels, and `generate`
    through `predict_with_generate`, padded with the model's pad id."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model, processor, losses = trained["siglip-distilbert-llama-prefix"]
    rows = [{"image": solid(color), "question": question, "answer": answer} for color, question, answer in EXAMPLES]
    arguments = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=len(rows), predict_with_generate=True,
        generation_max_length=9, remove_unused_columns=False, report_to=[], use_cpu=True,
    )

    def collate(batch: list[dict]) -> dict:
        return processor(
            images=[row["image"] for row in batch], text=[row["question"] for row in batch],
            answers=[row["answer"] for row in batch],
        )

    trainer = Seq2SeqTrainer(model=model, args=arguments, data_collator=collate, processing_class=processor)
    result = trainer.predict(rows)
    assert processor.batch_decode(result.predictions) == TARGETS
    assert result.metrics["test_loss"] == pytest.approx(losses[-1], rel=0.5)
