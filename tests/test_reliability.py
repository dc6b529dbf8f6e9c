"""Reliability and safety properties that cut across modules."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import solid

ROOT = Path(__file__).resolve().parent.parent
HUB_FILES = (
    "configuration_vqa_fusion",
    "modeling_vqa_fusion",
    "processing_vqa_fusion",
    "backbones_vqa_fusion",
    "fusion_vqa_fusion",
)

AUDIT = """
import json, os, sys
import PIL.Image, torch, transformers  # their own import-time work is not ours
events = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT
def hook(event, args):
    if event == "open":
        path, mode, flags = (list(args) + [None, None])[:3]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & WRITE_FLAGS):
            events.append(["write", str(path)])
    elif event in ("socket.connect", "socket.getaddrinfo", "urllib.Request"):
        events.append([event, str(args[:2])])
    elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork"):
        events.append([event, str(args[:2])])
sys.addaudithook(hook)
modules = [__import__(name) for name in sys.argv[1:]]
print("EVENTS" + json.dumps(events))
BASES = (transformers.PreTrainedConfig, transformers.PreTrainedModel, transformers.GenerationMixin, transformers.ProcessorMixin)
classes = {
    f"{module.__name__}.{name}": [base.__name__ for base in BASES if issubclass(value, base)] + [getattr(value, "_auto_class", None)]
    for module in modules
    for name, value in vars(module).items()
    if isinstance(value, type) and value.__module__ == module.__name__
}
print("CLASSES" + json.dumps(classes))
"""
# What each Hub file must define: `[transformers base classes..., the Auto class it is registered for]`.
HUB_CLASSES = {
    "configuration_vqa_fusion.VqaFusionConfig": ["PreTrainedConfig", "AutoConfig"],
    "modeling_vqa_fusion.VqaFusionForConditionalGeneration": ["PreTrainedModel", "GenerationMixin", "AutoModel"],
    "processing_vqa_fusion.VqaFusionProcessor": ["ProcessorMixin", "AutoProcessor"],
}


def test_hub_files_do_nothing_at_import_but_define_classes(tmp_path):
    """No network, no file writes, no subprocesses: they run on users' machines through trust_remote_code. Yet
    importing them defines the config, model and processor classes, registered for their Auto classes."""
    completed = subprocess.run(
        [sys.executable, "-c", AUDIT, *HUB_FILES],
        cwd=ROOT, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]

    def printed(tag: str):
        return json.loads(next(line[len(tag):] for line in completed.stdout.splitlines() if line.startswith(tag)))

    assert printed("EVENTS") == []
    classes = printed("CLASSES")
    assert {name: classes.get(name) for name in HUB_CLASSES} == HUB_CLASSES


def test_hub_files_import_only_transformers_torch_pil_numpy_and_each_other():
    allowed = {"transformers", "torch", "PIL", "numpy", "copy", "dataclasses", "inspect", "math", "typing", *HUB_FILES}
    for name in HUB_FILES:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] in allowed, f"{name}.py imports {module}"


def test_no_unsafe_torch_load_anywhere():
    """Weights travel as safetensors; a pickle load of a user's file could run code."""
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                owner = getattr(node.func.value, "id", None)
                if owner == "torch":
                    keywords = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                    assert keywords.get("weights_only") is True, f"{path}:{node.lineno}"


def test_saved_model_is_safetensors_only(make_model, tmp_path):
    make_model("mean").save_pretrained(tmp_path)
    weights = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl"))
    assert weights == ["model.safetensors"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=st.text(max_size=300), answer=st.text(max_size=80))
def test_processor_on_any_unicode_text(processor, question, answer):
    """Any question and answer: tensors of the promised shapes, or a ValueError naming the bad text."""
    try:
        batch = processor(images=[solid((10, 20, 30))], text=[question], answers=[answer])
    except ValueError as error:
        assert not question.strip() or not answer.strip()
        assert ("text[0]" in str(error)) or ("answers[0]" in str(error))
        return
    limit = processor.question_tokenizer.model_max_length
    assert batch["input_ids"].shape[0] == 1 and 2 <= batch["input_ids"].shape[1] <= limit
    assert batch["attention_mask"].all()
    labels = batch["labels"][0].tolist()
    assert 1 <= len(labels) <= processor.max_answer_length
    assert labels[-1] == processor.tokenizer.eos_token_id


def test_truncated_jpeg_and_fake_jpeg_name_the_file_and_question(tmp_path, processor):
    from vqa_collator import VqaCollator

    good = tmp_path / "good.jpg"
    solid((200, 10, 10), (64, 64)).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image")
    collator = VqaCollator(processor, answer_strategy=None)
    row = {"question": "What?", "answers": [], "multiple_choice_answer": None, "answer_type": None, "image_id": 1}
    assert collator([{**row, "question_id": 1, "image": str(good)}])["pixel_values"].shape[0] == 1
    for question_id, path in ((7, truncated), (8, fake), (9, tmp_path / "missing.jpg")):
        with pytest.raises(ValueError, match=rf"(?s)(?=.*{path.name})(?=.*\b{question_id}\b)"):
            collator([{**row, "question_id": question_id, "image": str(path)}])


def test_nan_pixels_never_reach_the_decoder(make_model, processor):
    model = make_model("sequence")
    batch = processor(images=[solid((1, 2, 3))], text=["What?"])
    batch["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.generate(**batch, max_new_tokens=2)
    assert torch.isnan(batch["pixel_values"]).any(), "the caller's tensor is left as it was"
