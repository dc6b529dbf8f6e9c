"""The tiny offline components: folders that load like hub ids, at the sizes asked for, with tokenizers that
know their training text and give the same ids on every run."""

import json
import os
import subprocess
import sys

from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from conftest import ANSWERS, QUESTIONS, ROOT, TEST_SIZES

BUILD = """
import sys
from tiny_components import TinySizes, build_tiny_components
sizes = TinySizes(hidden=8, heads=1, question_layers=1, vision_layers=1, decoder_layers=1, image_size=32)
build_tiny_components(sys.argv[1], ["What color is the square?", "How many circles?"], ["red", "2"], sizes)
"""


def test_parts_load_through_auto_classes_at_the_sizes_asked_for(tiny_parts):
    configs = {name: AutoConfig.from_pretrained(path) for name, path in tiny_parts.items()}
    question, vision, decoder = configs["question_encoder"], configs["vision_encoder"], configs["decoder"]
    assert (question.model_type, vision.model_type, decoder.model_type) == ("distilbert", "vit", "gpt2")
    assert question.dim == vision.hidden_size == decoder.n_embd == TEST_SIZES.hidden
    assert (question.n_layers, vision.num_hidden_layers, decoder.n_layer) == (
        TEST_SIZES.question_layers, TEST_SIZES.vision_layers, TEST_SIZES.decoder_layers,
    )
    assert (vision.image_size, vision.patch_size) == (TEST_SIZES.image_size, TEST_SIZES.patch_size)
    assert not decoder.add_cross_attention, "like gpt2 on the Hub: vqa-fusion adds the cross-attention"
    assert question.dropout == question.attention_dropout == vision.hidden_dropout_prob == 0
    assert decoder.resid_pdrop == decoder.embd_pdrop == decoder.attn_pdrop == 0
    image_processor = AutoImageProcessor.from_pretrained(tiny_parts["vision_encoder"])
    assert image_processor.size == {"height": TEST_SIZES.image_size, "width": TEST_SIZES.image_size}


def test_tokenizers_know_their_training_text_and_fit_the_models(tiny_parts):
    question_tokenizer = AutoTokenizer.from_pretrained(tiny_parts["question_encoder"])
    decoder_tokenizer = AutoTokenizer.from_pretrained(tiny_parts["decoder"])
    question_config = AutoConfig.from_pretrained(tiny_parts["question_encoder"])
    decoder_config = AutoConfig.from_pretrained(tiny_parts["decoder"])
    assert len(question_tokenizer) == question_config.vocab_size
    assert len(decoder_tokenizer) == decoder_config.vocab_size
    assert question_tokenizer.model_max_length == question_config.max_position_embeddings
    assert question_tokenizer.pad_token_id == question_config.pad_token_id
    assert decoder_tokenizer.eos_token_id == decoder_config.eos_token_id == decoder_config.bos_token_id

    tokens = question_tokenizer.convert_ids_to_tokens(question_tokenizer(QUESTIONS[0].upper())["input_ids"])
    assert tokens == ["[CLS]", "what", "color", "is", "the", "square", "?", "[SEP]"]
    for answer in ANSWERS:
        ids = decoder_tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        assert decoder_tokenizer.unk_token_id not in ids
        assert decoder_tokenizer.decode(ids) == " " + answer
    assert len(decoder_tokenizer(" red", add_special_tokens=False)["input_ids"]) == 1, "answers are learned whole"


def test_same_ids_on_every_run(tmp_path):
    """Two processes with different string hashing build byte-identical tokenizers."""
    folders = [tmp_path / seed for seed in ("1", "2")]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, str(folder)],
            env={**os.environ, "PYTHONHASHSEED": folder.name, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for folder in folders
    ]
    for process in processes:
        _, errors = process.communicate(timeout=300)
        assert process.returncode == 0, errors[-2000:]
    vocabularies = [
        [json.loads((folder / part / "tokenizer.json").read_text())["model"]["vocab"] for part in ("question_encoder", "decoder")]
        for folder in folders
    ]
    assert vocabularies[0] == vocabularies[1]
