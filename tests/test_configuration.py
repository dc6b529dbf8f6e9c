"""The configuration: three sub-configs, the fusion settings checked, token ids from the decoder, and a saved
config that reloads into the same thing and names every Auto class."""

import json

import pytest
from transformers import AutoConfig, DistilBertConfig, GPT2Config, ViTConfig

from configuration_vqa_fusion import VqaFusionConfig


@pytest.fixture(scope="module")
def parts(tiny_parts) -> dict[str, dict]:
    """The tiny parts' configs as dicts, as `from_pretrained_components` passes them."""
    return {name: AutoConfig.from_pretrained(path).to_dict() for name, path in tiny_parts.items()}


def test_defaults_are_the_books_parts_and_the_decoder_always_cross_attends():
    config = VqaFusionConfig(decoder={"model_type": "gpt2", "add_cross_attention": False, "is_decoder": False})
    assert isinstance(config.question_encoder, DistilBertConfig)
    assert isinstance(config.vision_encoder, ViTConfig)
    assert isinstance(config.decoder, GPT2Config)
    assert config.decoder.add_cross_attention and config.decoder.is_decoder
    assert (config.fusion, config.fusion_layers, config.is_encoder_decoder) == ("sequence", 0, True)


def test_token_ids_come_from_the_decoder_and_eos_pads_when_it_has_no_pad(parts):
    eos = parts["decoder"]["eos_token_id"]
    assert parts["decoder"].get("pad_token_id") is None
    config = VqaFusionConfig(**parts)
    assert (config.eos_token_id, config.bos_token_id, config.pad_token_id, config.decoder_start_token_id) == (eos,) * 4
    explicit = VqaFusionConfig(**parts, pad_token_id=eos + 1, decoder_start_token_id=eos + 2)
    assert (explicit.pad_token_id, explicit.decoder_start_token_id, explicit.eos_token_id) == (eos + 1, eos + 2, eos)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fusion="concat"), "fusion must be one of"),
        (dict(fusion="mean", fusion_layers=1), "fusion_layers=1 needs fusion='sequence'"),
    ],
)
def test_bad_fusion_settings_are_refused(parts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        VqaFusionConfig(**parts, **kwargs)


def test_projection_dim_must_match_the_decoder_width(parts):
    width = parts["decoder"]["n_embd"]
    assert VqaFusionConfig(**parts).projection_dim == width
    assert VqaFusionConfig(**parts, projection_dim=width).projection_dim == width
    with pytest.raises(ValueError, match=f"projection_dim={2 * width}.*hidden size is {width}"):
        VqaFusionConfig(**parts, projection_dim=2 * width)


def test_saved_config_reloads_equal_and_names_every_auto_class(parts, tmp_path):
    config = VqaFusionConfig(**parts, fusion="sequence", fusion_layers=2)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_vqa_fusion.VqaFusionConfig",
        "AutoModel": "modeling_vqa_fusion.VqaFusionForConditionalGeneration",
        "AutoModelForSeq2SeqLM": "modeling_vqa_fusion.VqaFusionForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_vqa_fusion.VqaFusionForConditionalGeneration",
    }
    reloaded = VqaFusionConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.fusion_layers == 2 and reloaded.decoder.n_embd == parts["decoder"]["n_embd"]
    assert type(reloaded.question_encoder) is DistilBertConfig
