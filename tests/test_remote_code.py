"""A saved folder loads in a fresh process, from another directory, through every Auto class and the
pipeline, with nothing of this repository importable: the remote-code path users take from the Hub. The batch
is padded on both sides of the model, and the loaded model must score each row as it does alone."""

import json
import os
import subprocess
import sys

import torch

from conftest import solid

# Questions of different token lengths and answers of different lengths: padding on both sides.
QUESTIONS = ["What color is the square?", "Is there a circle?"]
ANSWERS = ["a very long answer indeed", "red"]
COLORS = [(255, 0, 0), (0, 0, 255)]

LOADER = """
import json, sys
import torch
from PIL import Image
from transformers import (AutoConfig, AutoModel, AutoModelForImageTextToText, AutoModelForSeq2SeqLM,
                          AutoProcessor, pipeline)
folder, questions, answers, colors = sys.argv[1], *(json.loads(argument) for argument in sys.argv[2:5])
assert not any(name in sys.modules for name in ("modeling_vqa_fusion", "processing_vqa_fusion"))
images = [Image.new("RGB", (40, 30), tuple(color)) for color in colors]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
inputs = processor(images=images, text=questions, return_tensors="pt")
result = {"config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__name__}
for auto in (AutoModel, AutoModelForSeq2SeqLM, AutoModelForImageTextToText):
    model = auto.from_pretrained(folder, trust_remote_code=True)
    result[auto.__name__] = model.generate(**inputs, max_new_tokens=6).tolist()
labelled = processor(images=images, text=questions, answers=answers, return_tensors="pt")
result["padded"] = [not labelled["attention_mask"].all().item(), (labelled["labels"] == -100).any().item()]
result["deviation_from_alone"] = 0.0
with torch.no_grad():
    batched = model(**labelled).logits
    for row in range(len(questions)):
        alone = processor(images=images[row:row + 1], text=questions[row:row + 1], answers=answers[row:row + 1])
        logits = model(**alone).logits[0]
        deviation = (batched[row, : logits.shape[0]] - logits).abs().max().item()
        result["deviation_from_alone"] = max(result["deviation_from_alone"], deviation)
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
result["pipeline"] = [
    pipe(images=image, text=question, return_full_text=False, max_new_tokens=6)[0]["generated_text"]
    for image, question in zip(images, questions)
]
print("RESULT" + json.dumps(result))
"""


def test_saved_folder_loads_in_a_fresh_process_through_every_auto_class(make_model, processor, tmp_path):
    torch.manual_seed(1)
    model = make_model("sequence", seed=3).eval()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    inputs = processor(images=[solid(c) for c in COLORS], text=QUESTIONS)
    expected = model.generate(**inputs, max_new_tokens=6)
    expected_answers = processor.batch_decode(expected)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    completed = subprocess.run(
        [sys.executable, "-c", LOADER, str(folder), *map(json.dumps, (QUESTIONS, ANSWERS, COLORS))],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    result = json.loads(line[len("RESULT"):])

    assert result["config"] == "VqaFusionConfig"
    for auto in ("AutoModel", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText"):
        assert result[auto] == expected.tolist(), auto
    assert result["pipeline"] == expected_answers
    assert result["padded"] == [True, True], "the questions and the answers must both be padded"
    assert result["deviation_from_alone"] < 1e-5
