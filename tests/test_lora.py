"""LoRA: which weights train, what steps change, merging, a merged model without peft, and train_hf runs that
save merged models and resume from their checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import train_hf
from conftest import TEST_SIZES
from lora import add_lora, check_checkpoint_adapters, count_parameters, describe_trainable, merge_lora
from test_modeling import EXAMPLES, make_batch, overfit

R = 4
DECODER_LAYERS = {
    f"decoder.transformer.h.{i}.{name}"
    for i in range(TEST_SIZES.decoder_layers)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
}
QUESTION_ENCODER_LAYERS = {
    f"encoder.question_encoder.transformer.layer.{i}.{name}"
    for i in range(TEST_SIZES.question_layers)
    for name in ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2")
}
VISION_ENCODER_LAYERS = {
    f"encoder.vision_encoder.layers.{i}.{name}"
    for i in range(TEST_SIZES.vision_layers)
    for name in ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
}


def adapter_weights(layers: set[str]) -> set[str]:
    return {f"{layer}.lora_{matrix}.default.weight" for layer in layers for matrix in "AB"}


def new_parts(model: nn.Module) -> set[str]:
    """The fusion and the decoder's cross-attention: what vqa-fusion adds to the pretrained parts (names in a model
    without adapters)."""
    return {
        name
        for name, _ in model.named_parameters()
        if name.startswith("encoder.fusion.") or ".crossattention." in name or ".ln_cross_attn." in name
    }


def trainable(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_adapters_go_on_every_pretrained_decoder_layer_but_not_the_cross_attention_or_output(make_model):
    model = make_model()
    assert set(add_lora(model, r=R)) == DECODER_LAYERS
    lora_layers = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    assert lora_layers == DECODER_LAYERS


@pytest.mark.parametrize(
    "freeze, parts, adapted, trained_in_full",
    [
        ("encoders", "decoder", DECODER_LAYERS, ()),
        ("none", "decoder,question_encoder,vision_encoder", DECODER_LAYERS | QUESTION_ENCODER_LAYERS | VISION_ENCODER_LAYERS, ()),
        # Parts without adapters keep what `freeze` said: here all of the decoder and the question encoder train.
        ("none", ["vision_encoder"], VISION_ENCODER_LAYERS, ("decoder.", "encoder.question_encoder.")),
    ],
)
def test_only_adapters_and_new_parts_train_in_adapted_parts(make_model, freeze, parts, adapted, trained_in_full):
    model = make_model()
    model.freeze(freeze)
    new = new_parts(model)
    add_lora(model, r=R, parts=parts)
    in_full = {name for name, _ in model.named_parameters() if trained_in_full and name.startswith(trained_in_full)}
    assert trainable(model) == adapter_weights(adapted) | new | in_full


def test_trainable_count_is_the_adapters_plus_the_new_parts(make_model):
    model = make_model()
    model.freeze("encoders")
    plain = model.num_parameters()
    new = sum(parameter.numel() for name, parameter in model.named_parameters() if name in new_parts(model))
    add_lora(model, r=R)
    # GPT-2 at width 32: c_attn 32 -> 96, attn.c_proj 32 -> 32, c_fc 32 -> 128, mlp.c_proj 128 -> 32; r (in + out) each.
    adapters = TEST_SIZES.decoder_layers * R * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert count_parameters(model) == (adapters + new, plain + adapters)
    share = 100 * (adapters + new) / (plain + adapters)
    assert describe_trainable(model) == f"{adapters + new:,} of {plain + adapters:,} ({share:.2f} %)"


@pytest.fixture
def trained_lora(make_model, processor):
    """A model with decoder adapters after a few optimizer steps (so the adapters are far from their zero start),
    with a copy of its weights from before the steps."""
    model = make_model(seed=1)
    model.freeze("encoders")
    add_lora(model, r=R)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    overfit(model, make_batch(processor), steps=5, lr=1e-2)
    return model.eval(), before


def test_optimizer_steps_change_the_adapters_and_leave_frozen_weights_bit_identical(trained_lora, make_model):
    model, before = trained_lora
    after = model.state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    # Everything else (the encoders, the decoder's pretrained weights under the adapters) is bit-identical.
    assert changed == adapter_weights(DECODER_LAYERS) | new_parts(make_model())


def test_merging_gives_the_adapted_model_logits_and_a_plain_model(trained_lora, make_model, processor):
    model, _ = trained_lora
    batch = make_batch(processor)
    base_weight = model.decoder.transformer.h[0].attn.c_attn.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        adapted = model(**batch).logits
    assert merge_lora(model) == len(DECODER_LAYERS)
    with torch.no_grad():
        merged = model(**batch).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model.decoder.transformer.h[0].attn.c_attn.weight, base_weight)
    assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())
    assert model.state_dict().keys() == make_model().state_dict().keys()


LOADER_WITHOUT_PEFT = """
import json, sys
sys.modules["peft"] = None  # `import peft` raises ImportError from here on, and transformers sees no peft
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
folder, examples = sys.argv[1], json.loads(sys.argv[2])
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
images = [Image.new("RGB", (40, 30), tuple(color)) for color, _, _ in examples]
inputs = processor(images=images, text=[question for _, question, _ in examples], return_tensors="pt")
with torch.no_grad():
    result = {"ids": model.generate(**inputs, max_new_tokens=6).tolist(), "logits": model(**inputs).logits.tolist()}
assert sys.modules["peft"] is None
print("RESULT" + json.dumps(result))
"""


def test_merged_model_saves_and_loads_without_peft_with_the_same_answers(trained_lora, processor, tmp_path):
    model, _ = trained_lora
    batch = make_batch(processor, with_answers=False)
    with torch.no_grad():
        adapted_ids = model.generate(**batch, max_new_tokens=6)
        adapted_logits = model(**batch).logits
    merge_lora(model)
    folder = tmp_path / "merged"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [sys.executable, "-c", LOADER_WITHOUT_PEFT, str(folder), json.dumps(EXAMPLES)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    result = json.loads(line[len("RESULT"):])
    assert result["ids"] == adapted_ids.tolist()
    torch.testing.assert_close(torch.tensor(result["logits"]), adapted_logits, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_with_other_adapters_is_refused(make_model, tmp_path):
    model = make_model()
    add_lora(model, r=R)
    model.save_pretrained(tmp_path)
    same = make_model()
    add_lora(same, r=R)
    check_checkpoint_adapters(same, tmp_path)
    with pytest.raises(ValueError, match="16 LoRA tensors"):
        check_checkpoint_adapters(make_model(), tmp_path)
    question_encoder_too = make_model()
    add_lora(question_encoder_too, r=R, parts="decoder,question_encoder")
    with pytest.raises(ValueError, match="--lora_"):
        check_checkpoint_adapters(question_encoder_too, tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "rank must be positive"),
        (dict(r=R, parts="decoder,fusion"), "fusion"),
        (dict(r=R, target_modules="q_proj,v_proj"), "'q_proj,v_proj' match no layer of the decoder"),
        (dict(r=R, target_modules="c_attn,lm_head"), "output layer"),
    ],
)
def test_bad_lora_settings_are_named(make_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        add_lora(make_model(), **kwargs)


def test_adapters_go_on_a_llama_decoder_s_projections_and_merge_exactly():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    model = nn.ModuleDict({"decoder": LlamaForCausalLM(config)})
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    expected = {f"decoder.model.layers.{i}.self_attn.{name}" for i in range(2) for name in projections} | {
        f"decoder.model.layers.{i}.mlp.{name}" for i in range(2) for name in ("gate_proj", "up_proj", "down_proj")
    }
    assert set(add_lora(model, r=R)) == expected
    assert trainable(model) == adapter_weights(expected)
    for name, parameter in model.named_parameters():
        if ".lora_B." in name:
            nn.init.normal_(parameter, std=0.1)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        adapted = model["decoder"](input_ids=ids).logits
        merge_lora(model)
        merged = model["decoder"](input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert model["decoder"].state_dict().keys() == LlamaForCausalLM(config).state_dict().keys()


def lora_run(shapes, output_dir, *extra: str) -> list[str]:
    """The tiny preset with decoder adapters, six steps on one fixed batch of 16 questions (so that every step sees
    the same data and a resumed run can match an uninterrupted one bit for bit), a checkpoint every three steps.
    Adapters on the ViT too: transformers saves ViT weights under their original names, which a resume must not
    lose."""
    return [
        str(train_hf.DEMO_CONFIG), "--synthetic_data_dir", str(shapes), "--synthetic_train_images", "60", "--synthetic_eval_images", "8",
        "--max_eval_samples", "4", "--show_examples", "0", "--max_train_samples", "16", "--per_device_train_batch_size", "16", "--max_steps", "6",
        "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "1", "--do_eval", "false",
        "--lora_r", str(R), "--lora_parts", "decoder,vision_encoder", "--output_dir", str(output_dir), "--disable_tqdm", "true",
        *extra,
    ]


def test_train_hf_lora_run_trains_saves_merged_and_resumes_from_its_checkpoint(tmp_path, caplog, capsys):
    shapes = tmp_path / "shapes"
    whole = tmp_path / "whole"
    with caplog.at_level("INFO", logger="train_hf"):
        train_hf.main(lora_run(shapes, whole))
    steps = [entry for entry in json.loads((whole / "trainer_state.json").read_text())["log_history"] if "loss" in entry]
    losses = [entry["loss"] for entry in steps]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.3

    saved = load_file(whole / "model.safetensors")
    assert not [name for name in saved if ".lora_" in name or ".base_layer." in name]
    assert any(".lora_" in name for name in load_file(whole / "checkpoint-3" / "model.safetensors"))
    trainable_line = next(r.getMessage() for r in caplog.records if "trainable: " in r.getMessage())
    share = trainable_line.split("trainable: ")[1]
    assert share.endswith("%)") and f"| {share} |" in (whole / "README.md").read_text()

    # A run cut off after its first checkpoint: only checkpoint-3 in its folder.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(whole / "checkpoint-3", cut / "checkpoint-3")
    capsys.readouterr()
    train_hf.main(lora_run(shapes, cut, "--resume_from_checkpoint", "last"))
    assert capsys.readouterr().out.count("{'loss': ") == 3, "the resumed run did not run steps 4 to 6 only"
    resumed_steps = json.loads((cut / "trainer_state.json").read_text())["log_history"]
    assert [entry for entry in resumed_steps if "loss" in entry] == steps
    resumed = load_file(cut / "model.safetensors")
    assert resumed.keys() == saved.keys()
    assert all(torch.equal(resumed[name], saved[name]) for name in saved)
