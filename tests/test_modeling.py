"""The model: learning, generation, the book's fusion, freezing, input checks and saving."""

import json

import pytest
import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from conftest import solid
from modeling_vqa_fusion import VqaFusionForConditionalGeneration

# Questions of 4 to 9 tokens and answers of 1 to 5 tokens + EOS: every batch of them is padded on both sides
# of the model (question padding in the memory the decoder cross-attends to, -100 after the shorter answers).
EXAMPLES = [
    ((255, 0, 0), "What color is the square?", "red"),
    ((0, 255, 0), "What color is the square there?", "green"),
    ((0, 0, 255), "Is there a red circle?", "no"),
    ((255, 0, 0), "Is there a circle?", "yes"),
    ((0, 0, 255), "How many?", "3"),
    ((255, 255, 0), "What color is the square?", "a very long answer indeed"),
]


def make_batch(processor, examples=EXAMPLES, with_answers=True):
    return processor(
        images=[solid(color) for color, _, _ in examples],
        text=[question for _, question, _ in examples],
        answers=[answer for _, _, answer in examples] if with_answers else None,
    )


def overfit(model, batch, steps=150, lr=3e-3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(tiny_parts, processor):
    """Models of both fusions overfitted on EXAMPLES, with their loss curves."""
    result = {}
    for name, fusion, layers in (("sequence", "sequence", 0), ("sequence+layer", "sequence", 1), ("mean", "mean", 0)):
        torch.manual_seed(0)
        model = VqaFusionForConditionalGeneration.from_pretrained_components(
            **tiny_parts, fusion=fusion, fusion_layers=layers
        )
        losses = overfit(model, make_batch(processor))
        result[name] = (model.eval(), losses)
    return result


@pytest.mark.parametrize("fusion", ["sequence", "sequence+layer", "mean"])
def test_learns_answers_and_stops_at_eos(trained, processor, fusion):
    model, losses = trained[fusion]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.1 * losses[0]
    max_new_tokens = 12
    ids = model.generate(**make_batch(processor, with_answers=False), max_new_tokens=max_new_tokens)
    assert processor.batch_decode(ids) == [answer for _, _, answer in EXAMPLES]
    assert (ids[:, 0] == model.config.decoder_start_token_id).all()
    eos = model.config.eos_token_id
    for row in ids.tolist():
        generated = row[1:]
        assert eos in generated, "every answer must end with EOS"
        assert generated.index(eos) < max_new_tokens - 1


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("fusion", ["sequence", "sequence+layer", "mean"])
def test_cached_and_uncached_generation_identical(trained, processor, num_beams, fusion):
    model, _ = trained[fusion]
    inputs = make_batch(processor, with_answers=False)
    cached = model.generate(**inputs, max_new_tokens=8, num_beams=num_beams, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=8, num_beams=num_beams, use_cache=False)
    assert torch.equal(cached, uncached)


def test_generation_runs_the_encoder_once(trained, processor):
    model, _ = trained["sequence"]
    calls = []
    handle = model.encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.generate(**make_batch(processor, with_answers=False), max_new_tokens=8, num_beams=2)
    finally:
        handle.remove()
    assert len(calls) == 1


def assert_padded_on_both_sides(batch) -> None:
    assert not batch["attention_mask"].all(), "some question must be padded"
    assert (batch["labels"] == -100).any(), "some answer must be padded"


@pytest.mark.parametrize("fusion", ["sequence", "sequence+layer", "mean"])
def test_batched_generation_matches_one_by_one(trained, processor, fusion):
    """The same tokens and the same logits at every step, whether a question is generated for in a padded
    batch or alone."""
    model, _ = trained[fusion]
    assert_padded_on_both_sides(make_batch(processor))

    def generate(examples):
        inputs = make_batch(processor, examples, with_answers=False)
        output = model.generate(**inputs, max_new_tokens=8, output_logits=True, return_dict_in_generate=True)
        return output.sequences, torch.stack(output.logits, dim=1)

    sequences, logits = generate(EXAMPLES)
    for row, example in enumerate(EXAMPLES):
        single_sequence, single_logits = generate([example])
        length = single_sequence.shape[1]
        assert torch.equal(sequences[row, :length], single_sequence[0]), example
        torch.testing.assert_close(logits[row, : length - 1], single_logits[0], atol=1e-4, rtol=1e-4)
    assert processor.batch_decode(sequences) == [answer for _, _, answer in EXAMPLES]


@pytest.mark.parametrize("fusion, fusion_layers", [("sequence", 0), ("sequence", 1), ("mean", 0)])
def test_padded_rows_score_their_answers_as_they_do_alone(make_model, processor, fusion, fusion_layers):
    """Question padding (in the memory the decoder cross-attends to) and answer padding (-100 after EOS) change
    nothing: every row's logits over its own answer tokens are those of the row alone."""
    model = make_model(fusion, fusion_layers=fusion_layers).eval()
    batch = make_batch(processor)
    assert_padded_on_both_sides(batch)
    with torch.no_grad():
        batched = model(**batch).logits
        for row, example in enumerate(EXAMPLES):
            alone = model(**make_batch(processor, [example])).logits
            torch.testing.assert_close(batched[row, : alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)


def test_mean_fusion_ignores_question_padding(make_model, processor):
    model = make_model("mean").eval()
    alone = processor(images=[solid((9, 99, 199))], text=["Is there a red circle?"])
    padded = processor(
        images=[solid((9, 99, 199)), solid((0, 0, 0))],
        text=["Is there a red circle?", "How many triangles are there in this rather busy picture today?"],
    )
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1], "the first question must be padded"
    with torch.no_grad():
        memory_alone = model.encoder(**alone).last_hidden_state
        memory_padded = model.encoder(**padded).last_hidden_state
    assert memory_alone.shape == (1, 1, model.config.projection_dim)
    torch.testing.assert_close(memory_padded[:1], memory_alone, atol=1e-5, rtol=1e-5)


def test_sequence_fusion_layers_ignore_question_padding(make_model, processor):
    model = make_model("sequence", fusion_layers=1).eval()
    alone = processor(images=[solid((9, 99, 199))], text=["Is there a red circle?"])
    padded = processor(
        images=[solid((9, 99, 199)), solid((0, 0, 0))],
        text=["Is there a red circle?", "How many triangles are there in this rather busy picture today?"],
    )
    real = padded["attention_mask"][0].bool()
    assert not real.all(), "the first question must be padded"
    with torch.no_grad():
        memory_alone = model.encoder(**alone)
        memory_padded = model.encoder(**padded)
    question_length = padded["input_ids"].shape[1]
    kept = torch.cat([real, torch.ones(memory_padded.last_hidden_state.shape[1] - question_length, dtype=torch.bool)])
    torch.testing.assert_close(memory_padded.last_hidden_state[0, kept], memory_alone.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(memory_padded.question_embedding[:1], memory_alone.question_embedding, atol=1e-5, rtol=1e-5)
    assert memory_padded.attention_mask[0].tolist() == kept.long().tolist()


def set_cross_attention(decoder, seed: int = 0) -> None:
    """Give a GPT-2's new cross-attention weight matrices known values (std 0.2, large enough for the memory to
    move the loss), the same for every GPT-2 of the same shape."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(decoder.named_parameters()):
            if "crossattention" in name and parameter.dim() == 2:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))


def test_mean_fusion_reproduces_the_books_loss(make_model, processor, tiny_parts):
    """The book's computation, rebuilt from the three parts' folders with none of the model's code: each
    encoder's last states averaged (padding included, so the questions here are unpadded), one Linear each,
    (text + image) / 2 as one cross-attention token, GPT-2 with cross-attention on BOS + answer + EOS padded
    with EOS, labels = the same ids with -100 on padding (GPT-2 shifts them itself). Only the projection weights
    are taken from the model; the decoder's fresh cross-attention gets the same known weights in both."""
    examples = [
        ((255, 0, 0), "What color is the square?", "red"),
        ((0, 0, 255), "What color is the circle?", "a very long answer indeed"),
    ]
    question_tokenizer = AutoTokenizer.from_pretrained(tiny_parts["question_encoder"])
    image_processor = AutoImageProcessor.from_pretrained(tiny_parts["vision_encoder"])
    answer_tokenizer = AutoTokenizer.from_pretrained(tiny_parts["decoder"])
    question_encoder = AutoModel.from_pretrained(tiny_parts["question_encoder"]).eval()
    vision_encoder = AutoModel.from_pretrained(tiny_parts["vision_encoder"]).eval()
    decoder = AutoModelForCausalLM.from_pretrained(tiny_parts["decoder"], add_cross_attention=True).eval()
    model = make_model("mean").eval()
    set_cross_attention(decoder)
    set_cross_attention(model.decoder)
    weights = model.state_dict()

    def project(name: str, states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(states, weights[f"encoder.fusion.{name}.weight"], weights[f"encoder.fusion.{name}.bias"])

    questions = question_tokenizer([q for _, q, _ in examples], return_tensors="pt", return_token_type_ids=False)
    assert questions["attention_mask"].all(), "the book's mean includes padding: compare on unpadded questions"
    pixel_values = image_processor([solid(color) for color, _, _ in examples], return_tensors="pt")["pixel_values"]
    rows = [
        [answer_tokenizer.bos_token_id] + answer_tokenizer(" " + answer)["input_ids"] + [answer_tokenizer.eos_token_id]
        for *_, answer in examples
    ]
    width = max(len(row) for row in rows)
    sequence = torch.tensor([row + [answer_tokenizer.eos_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    assert not mask.all(), "answers of different lengths: the labels are padded"
    with torch.no_grad():
        text = question_encoder(**questions).last_hidden_state.mean(dim=1)
        image = vision_encoder(pixel_values=pixel_values).last_hidden_state.mean(dim=1)
        fused = ((project("question_projection", text) + project("image_projection", image)) / 2).unsqueeze(1)
        labels = sequence.masked_fill(mask == 0, -100)
        book_loss = decoder(input_ids=sequence, attention_mask=mask, encoder_hidden_states=fused, labels=labels).loss
        our_loss = model(**make_batch(processor, examples)).loss
    torch.testing.assert_close(our_loss, book_loss, atol=1e-5, rtol=0)


def test_labels_ignore_padding_and_keep_eos(make_model, processor):
    """What sits under -100 (the decoder's inputs there, or more -100 columns) must not change the loss; EOS
    (== GPT-2's pad id) must count."""
    model = make_model("sequence").eval()
    batch = make_batch(processor)
    labels = batch["labels"]
    padding = labels == -100
    assert padding.any(), "the answers must have different lengths"
    eos = processor.tokenizer.eos_token_id
    assert eos == model.config.pad_token_id
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels)
    noise = torch.randint(0, model.config.decoder.vocab_size, labels.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = model(**batch).loss
        assert torch.equal(model(**batch, decoder_input_ids=decoder_input_ids).loss, loss)
        other_inputs = torch.where(padding, noise, decoder_input_ids)
        assert not torch.equal(other_inputs, decoder_input_ids)
        torch.testing.assert_close(model(**batch, decoder_input_ids=other_inputs).loss, loss, atol=1e-6, rtol=0)
        wider = torch.cat([labels, torch.full((labels.shape[0], 3), -100)], dim=1)
        torch.testing.assert_close(model(**{**batch, "labels": wider}).loss, loss, atol=1e-6, rtol=0)
        without_eos = labels.masked_fill(labels == eos, -100)
        assert not torch.isclose(model(**{**batch, "labels": without_eos}).loss, loss)


@pytest.mark.parametrize("fusion, fusion_layers", [("sequence", 0), ("sequence", 1), ("mean", 0)])
def test_every_trainable_parameter_gets_a_gradient(make_model, processor, fusion, fusion_layers):
    model = make_model(fusion, fusion_layers=fusion_layers)
    model(**make_batch(processor)).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def trainable_groups(model) -> dict[str, set[bool]]:
    groups = {"question_encoder": set(), "vision_encoder": set(), "fusion": set(), "cross": set(), "decoder_rest": set()}
    for name, parameter in model.named_parameters():
        if name.startswith("encoder.question_encoder."):
            key = "question_encoder"
        elif name.startswith("encoder.vision_encoder."):
            key = "vision_encoder"
        elif name.startswith("encoder.fusion."):
            key = "fusion"
        elif "crossattention" in name or "ln_cross_attn" in name:
            key = "cross"
        else:
            key = "decoder_rest"
        groups[key].add(parameter.requires_grad)
    return groups


@pytest.mark.parametrize(
    "spec, frozen",
    [
        ("none", set()),
        ("encoders", {"question_encoder", "vision_encoder"}),
        ("question_encoder", {"question_encoder"}),
        ("vision_encoder", {"vision_encoder"}),
        ("decoder", {"decoder_rest"}),
        ("all", {"question_encoder", "vision_encoder", "decoder_rest"}),
        ("vision_encoder, decoder", {"vision_encoder", "decoder_rest"}),
    ],
)
def test_freeze_sets_exactly_the_expected_flags(make_model, spec, frozen):
    model = make_model("sequence")
    model.freeze("all")
    model.freeze(spec)
    for group, flags in trainable_groups(model).items():
        assert flags == {group not in frozen}, group


def test_freeze_rejects_unknown_spec(make_model):
    with pytest.raises(ValueError, match="vision"):
        make_model().freeze("vision")


def test_frozen_encoders_build_no_graph(make_model, processor):
    model = make_model("sequence")
    model.freeze("encoders")
    states = {}
    model.encoder.vision_encoder.register_forward_hook(lambda m, i, out: states.update(vision=out.last_hidden_state))
    model.encoder.question_encoder.register_forward_hook(lambda m, i, out: states.update(question=out.last_hidden_state))
    model(**make_batch(processor)).loss.backward()
    assert states["vision"].grad_fn is None and states["question"].grad_fn is None
    assert all(p.grad is not None for p in model.encoder.fusion.parameters())


def bad_input_cases(batch):
    nan = batch["pixel_values"].clone()
    nan[0, 0, 0, 0] = float("nan")
    inf = batch["pixel_values"].clone()
    inf[-1, 1, 2, 3] = float("inf")
    return {
        "nan": ({**batch, "pixel_values": nan}, "NaN"),
        "inf": ({**batch, "pixel_values": inf}, "infinite"),
        "batch": ({**batch, "pixel_values": batch["pixel_values"][:2]}, "batch sizes differ"),
        "size": ({**batch, "pixel_values": torch.zeros(6, 3, 48, 48)}, "vision encoder takes"),
        "rank": ({**batch, "pixel_values": batch["pixel_values"][0]}, "pixel_values must have shape"),
        "channels": ({**batch, "pixel_values": batch["pixel_values"][:, :1]}, "pixel_values must have shape"),
        "integer": ({**batch, "pixel_values": batch["pixel_values"].to(torch.uint8)}, "floating point"),
        "no_pixels": ({k: v for k, v in batch.items() if k != "pixel_values"}, "pixel_values must be given"),
        "nothing": ({"labels": batch["labels"]}, "input_ids and pixel_values must be given"),
        "labels": ({**batch, "labels": batch["labels"][:1]}, "labels has 1 rows"),
        "mask": ({**batch, "attention_mask": batch["attention_mask"][:, :2]}, "attention_mask has shape"),
        "float_ids": ({**batch, "input_ids": batch["input_ids"].float()}, "input_ids must be an integer tensor"),
    }


@pytest.mark.parametrize(
    "case",
    ["nan", "inf", "batch", "size", "rank", "channels", "integer", "no_pixels", "nothing", "labels", "mask", "float_ids"],
)
def test_bad_inputs_raise_clear_errors(make_model, processor, case):
    model = make_model("sequence")
    inputs, message = bad_input_cases(make_batch(processor))[case]
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_from_pretrained_components_keeps_pretrained_weights(make_model, tiny_parts):
    model = make_model("sequence")
    parts = {
        "encoder.question_encoder.": AutoModel.from_pretrained(tiny_parts["question_encoder"]),
        "encoder.vision_encoder.": AutoModel.from_pretrained(tiny_parts["vision_encoder"]),
        "decoder.": AutoModelForCausalLM.from_pretrained(tiny_parts["decoder"]),
    }
    ours = model.state_dict()
    for prefix, part in parts.items():
        for key, value in part.state_dict().items():
            if prefix + key in ours:
                torch.testing.assert_close(ours[prefix + key], value, rtol=0, atol=0)
    kept = sum(key.startswith(prefix) for prefix in parts for key in ours)
    assert kept > 0.9 * sum(len(part.state_dict()) for part in parts.values())


def test_initializer_range_sets_the_std_of_the_new_weights_only(tiny_parts):
    def build(**kwargs) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = VqaFusionForConditionalGeneration.from_pretrained_components(**tiny_parts, fusion_layers=1, **kwargs)
        return dict(model.named_parameters())

    default, wide = build(), build(initializer_range=0.1)
    pretrained = [name for name in default if name.startswith(("encoder.question_encoder.", "encoder.vision_encoder."))]
    pretrained += [name for name in default if name.startswith("decoder.") and "cross" not in name]
    assert len(pretrained) > 20
    for name in pretrained:
        assert torch.equal(default[name], wide[name]), name
    # Every new weight matrix large enough for its sample std to be meaningful (1,024+ values).
    new = [name for name, p in default.items() if name not in pretrained and p.dim() == 2 and p.numel() >= 1024]
    assert {
        "decoder.transformer.h.0.crossattention.c_attn.weight",
        "encoder.fusion.question_projection.weight",
        "encoder.fusion.image_projection.weight",
        "encoder.fusion.layers.0.self_attn.in_proj_weight",
        "encoder.fusion.layers.0.linear1.weight",
    } <= set(new)
    for name in new:
        # GPT-2 scales its residual projections (`c_proj`) down by sqrt(2 * layers); every other one is at the range.
        assert wide[name].std().item() == pytest.approx(5 * default[name].std().item(), rel=0.05), name
        if "c_proj" not in name:
            assert default[name].std().item() == pytest.approx(0.02, rel=0.1), name
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="initializer_range"):
            VqaFusionForConditionalGeneration.from_pretrained_components(**tiny_parts, initializer_range=bad)


def test_save_and_reload_safetensors_tied_weights_same_outputs(trained, processor, tmp_path):
    model, _ = trained["sequence"]
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert {"configuration_vqa_fusion.py", "modeling_vqa_fusion.py"} <= set(files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText"}

    reloaded = VqaFusionForConditionalGeneration.from_pretrained(tmp_path).eval()
    decoder = reloaded.decoder
    assert decoder.lm_head.weight.data_ptr() == decoder.transformer.wte.weight.data_ptr()
    inputs = make_batch(processor, with_answers=False)
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=8), model.generate(**inputs, max_new_tokens=8))


def test_forward_without_answers_scores_the_first_answer_token(trained, processor):
    model, _ = trained["sequence"]
    inputs = make_batch(processor, with_answers=False)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=1)
    assert logits.shape[:2] == (len(EXAMPLES), 1)
    assert torch.equal(logits[:, 0].argmax(-1), generated[:, 1])


def test_training_forward_builds_no_cache(make_model, processor):
    model = make_model("sequence").train()
    assert model(**make_batch(processor)).cache is None


def test_generation_length_follows_max_length(make_model, processor):
    """The default generation config sets a length limit that `max_length` (what Seq2SeqTrainer's
    `generation_max_length` becomes) overrides, instead of a `max_new_tokens` that would win over it."""
    model = make_model("sequence").eval()
    inputs = make_batch(processor, with_answers=False)
    assert model.generation_config.max_new_tokens is None
    default = model.generate(**inputs, min_length=model.generation_config.max_length)
    assert default.shape[1] == model.generation_config.max_length
    assert model.generate(**inputs, max_length=4, min_length=4).shape[1] == 4
