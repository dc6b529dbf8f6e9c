"""train_hf.py end to end, in every documented run mode, with real files and real processes.

The data: small VQA files in the official layout (questions, annotations, COCO-named images; a test-dev
split whose images are the test2015 ones). Each 64-px image shows one circle in one of four colours and
two sizes, and its three questions can only be answered from the image: "What color is the circle?",
"Is it a warm color?", "Is the circle big?". A tiny model learns them in 150 steps; a model that cannot
see the images can do no better than the most common answer to each question.
"""

import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
import transformers
import yaml
from huggingface_hub.utils import filter_repo_objects
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoProcessor

import train_hf
from vqa_collator import VqaCollator
from vqa_data import VqaImageError, load_vqa_files

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "train_hf.py")
DEMO = str(ROOT / "configs" / "demo.yaml")
COLOURS = {"red": (220, 40, 40), "yellow": (230, 200, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
WARM = {"red", "yellow"}
QUIET = ["--disable_tqdm", "true", "--show_examples", "0"]


# ---------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------


def circle_image(colour: str, big: bool) -> Image.Image:
    image = Image.new("RGB", (64, 64), (235, 235, 235))
    margin = 6 if big else 20
    ImageDraw.Draw(image).ellipse((margin, margin, 63 - margin, 63 - margin), fill=COLOURS[colour])
    return image


def write_split(folder: Path, subtype: str, image_ids: range, image_subtype: str | None = None) -> dict[str, Path]:
    """Official-format questions and annotations, and the images as `<image_subtype>/COCO_<image_subtype>_<id>.jpg`.
    Every question has ten human answers; one annotator disagrees on the colour."""
    rng = random.Random(subtype)
    image_subtype = image_subtype or subtype
    images = folder / image_subtype
    images.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for image_id in image_ids:
        colour, big = rng.choice(sorted(COLOURS)), rng.random() < 0.5
        circle_image(colour, big).save(images / f"COCO_{image_subtype}_{image_id:012d}.jpg", quality=95)
        other_colour = rng.choice([name for name in COLOURS if name != colour])
        qas = [
            ("What color is the circle?", colour, "other", [colour] * 9 + [other_colour]),
            ("Is it a warm color?", "yes" if colour in WARM else "no", "yes/no", None),
            ("Is the circle big?", "yes" if big else "no", "yes/no", None),
        ]
        for k, (question, answer, answer_type, humans) in enumerate(qas):
            question_id = image_id * 10 + k
            questions.append({"image_id": image_id, "question": question, "question_id": question_id})
            annotations.append({
                "question_id": question_id, "image_id": image_id, "question_type": question.split()[0].lower(),
                "answer_type": answer_type, "multiple_choice_answer": answer,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(humans or [answer] * 10)],
            })
    header = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": subtype}
    paths = {
        "questions": folder / f"v2_OpenEnded_mscoco_{subtype}_questions.json",
        "annotations": folder / f"v2_mscoco_{subtype}_annotations.json",
        "images": images,
    }
    paths["questions"].write_text(json.dumps({**header, "task_type": "Open-Ended", "questions": questions}))
    paths["annotations"].write_text(json.dumps({**header, "annotations": annotations}))
    return paths


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """train2014 (240 images), val2014 (40) and test-dev2015 (20 images of test2015, which has 30): the
    test-dev annotations exist only to check its predictions, never given to the script."""
    folder = tmp_path_factory.mktemp("vqa")
    splits = {
        "train": write_split(folder, "train2014", range(1, 241)),
        "val": write_split(folder, "val2014", range(1001, 1041)),
        "test-dev": write_split(folder, "test-dev2015", range(2001, 2021), image_subtype="test2015"),
    }
    for image_id in range(2021, 2031):  # test2015 holds more images than test-dev asks about
        circle_image("red", True).save(folder / "test2015" / f"COCO_test2015_{image_id:012d}.jpg")
    return splits


def split_flags(prefix: str, paths: dict, kinds: tuple[str, ...] = ("questions", "annotations", "images")) -> list[str]:
    """`--<prefix>_questions <file> ...` for one split's files."""
    return [value for kind in kinds for value in (f"--{prefix}_{kind}", str(paths[kind]))]


def official_flags(files: dict) -> list[str]:
    """Training on train2014, evaluation on val2014."""
    return split_flags("train", files["train"]) + split_flags("eval", files["val"])


def question_ids(paths: dict) -> list[int]:
    return [q["question_id"] for q in json.loads(paths["questions"].read_text())["questions"]]


def rescore(predictions: list[dict], annotations_file: Path) -> dict[str, float]:
    """The official accuracy recomputed from `predictions.json` and the annotation file, independently of
    vqa_metric: each prediction scores the mean over the ten leave-one-out subsets of min(1, matches / 3),
    on exact strings (these answers need no normalisation beyond case); percent, two decimals, overall and
    per answer type."""
    annotations = {a["question_id"]: a for a in json.loads(annotations_file.read_text())["annotations"]}
    scores = defaultdict(list)
    for prediction in predictions:
        annotation = annotations[prediction["question_id"]]
        humans = [human["answer"] for human in annotation["answers"]]
        answer = prediction["answer"].strip().lower()
        matches = humans.count(answer)
        score = sum(min(1.0, (matches - (human == answer)) / 3) for human in humans) / len(humans)
        scores["overall"].append(score)
        scores[annotation["answer_type"]].append(score)
    return {name: round(100 * sum(values) / len(values), 2) for name, values in scores.items()}


def question_lookup_accuracy(files: dict) -> float:
    """The accuracy of answering each question with its most common training answer: the best a model can
    do without looking at the images."""
    train = json.loads(files["train"]["annotations"].read_text())["annotations"]
    texts = {q["question_id"]: q["question"] for q in json.loads(files["train"]["questions"].read_text())["questions"]}
    answers = defaultdict(Counter)
    for annotation in train:
        answers[texts[annotation["question_id"]]][annotation["multiple_choice_answer"]] += 1
    val = json.loads(files["val"]["questions"].read_text())["questions"]
    predictions = [{"question_id": q["question_id"], "answer": answers[q["question"]].most_common(1)[0][0]} for q in val]
    return rescore(predictions, files["val"]["annotations"])["overall"]


def run(output_dir: Path, *flags: str) -> dict[str, float]:
    """train_hf as a user runs it, in this process."""
    return train_hf.main([*flags, "--output_dir", str(output_dir), *QUIET])


# 150 steps of batch 16 (10 epochs of the 720 training questions) at lr 1e-3: the tiny preset reads colour and
# size from the images by then.
LEARNING = ["--preset", "tiny", "--max_steps", "150", "--per_device_train_batch_size", "16", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """Flags alone, no recipe file: the tiny preset trained and evaluated on the official-format files."""
    output_dir = tmp_path_factory.mktemp("trained")
    return output_dir, run(output_dir, *LEARNING, *official_flags(files))


@pytest.fixture(scope="module")
def blind(files, tmp_path_factory) -> dict[str, float]:
    """The control: the same run on a copy of the data in which every image is the same grey square."""
    folder = tmp_path_factory.mktemp("blind")
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    copies = {}
    for split in ("train", "val"):
        paths = files[split]
        images = folder / paths["images"].name
        images.mkdir()
        for image in paths["images"].iterdir():
            grey.save(images / image.name)
        copies[split] = {**paths, "images": images}
    return run(folder / "run", *LEARNING, *official_flags(copies))


# ---------------------------------------------------------------------------------------------
# Learning, outputs, reloading
# ---------------------------------------------------------------------------------------------


def test_flags_alone_train_a_model_that_reads_the_images(trained, blind, files):
    _, metrics = trained
    lookup = question_lookup_accuracy(files)
    assert lookup < 50
    assert blind["eval_vqa_accuracy"] < lookup + 5, "a model that sees no image can only learn the questions"
    assert metrics["eval_vqa_accuracy"] > blind["eval_vqa_accuracy"] + 30
    assert metrics["eval_vqa_accuracy"] > lookup + 30


def test_tiny_preset_with_a_conv_net_and_a_llama_prefix_decoder_reads_the_images(files, blind, tmp_path):
    """The tiny preset's other parts: a ResNet's feature map as image tokens, and a Llama-style decoder that reads
    the fused tokens as the prefix of its input."""
    output_dir = tmp_path / "out"
    parts = ["--tiny_vision_encoder", "resnet", "--tiny_decoder", "llama", "--fusion", "prefix"]
    metrics = run(output_dir, *LEARNING, *parts, *official_flags(files))
    config = json.loads((output_dir / "config.json").read_text())
    assert (config["vision_encoder"]["model_type"], config["decoder"]["model_type"]) == ("resnet", "llama")
    assert config["fusion"] == "prefix"
    assert metrics["eval_vqa_accuracy"] > blind["eval_vqa_accuracy"] + 30


def test_outputs_are_complete_and_rescored_from_the_files(trained, files):
    output_dir, metrics = trained
    names = {path.name for path in output_dir.iterdir()}
    assert {
        "config.json", "model.safetensors", "generation_config.json", "processor_config.json", "tokenizer.json",
        "question_tokenizer", "configuration_vqa_fusion.py", "modeling_vqa_fusion.py", "processing_vqa_fusion.py",
        "trainer_state.json", "eval_results.json", "predictions.json", "README.md", "training_curves.png",
    } <= names
    predictions = json.loads((output_dir / "predictions.json").read_text())
    assert [row["question_id"] for row in predictions] == question_ids(files["val"])
    assert all(set(row) == {"question_id", "answer"} and isinstance(row["answer"], str) for row in predictions)

    rescored = rescore(predictions, files["val"]["annotations"])
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["eval_vqa_accuracy"] == rescored["overall"] == metrics["eval_vqa_accuracy"]
    assert results["eval_vqa_accuracy_yes_no"] == rescored["yes/no"]
    assert results["eval_vqa_accuracy_other"] == rescored["other"]

    card = (output_dir / "README.md").read_text()
    assert f"| eval_vqa_accuracy | {metrics['eval_vqa_accuracy']} |" in card
    assert "tiny preset, built offline" in card and "| lr_scheduler_type | linear |" in card
    assert str(output_dir.parent) not in card and str(files["train"]["questions"].parent) not in card
    assert "SchedulerType" not in card


def test_saved_run_reloads_and_reproduces_its_predictions(trained, files):
    output_dir, _ = trained
    model = AutoModel.from_pretrained(output_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    evaluation = load_vqa_files(files["val"]["questions"], files["val"]["annotations"], files["val"]["images"])
    batch = VqaCollator(processor, answer_strategy=None)([evaluation[i] for i in range(12)])
    with torch.no_grad():
        answers = processor.batch_decode(model.generate(**batch))
    predictions = json.loads((output_dir / "predictions.json").read_text())
    assert answers == [row["answer"] for row in predictions[:12]]


# ---------------------------------------------------------------------------------------------
# Evaluation and prediction without training
# ---------------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def test_evaluation_only_needs_no_training_files_and_writes_nothing_into_the_model(trained, files, tmp_path):
    model_dir, trained_metrics = trained
    before = snapshot(model_dir)
    metrics = run(tmp_path / "eval", "--model_name_or_path", str(model_dir), *split_flags("eval", files["val"]))
    vqa = {name: value for name, value in metrics.items() if "vqa_accuracy" in name}
    assert vqa == {name: value for name, value in trained_metrics.items() if "vqa_accuracy" in name}
    assert (tmp_path / "eval" / "predictions.json").read_text() == (model_dir / "predictions.json").read_text()
    written = {path.name for path in (tmp_path / "eval").iterdir()}
    assert {"eval_results.json", "predictions.json"} <= written
    assert not written & {"README.md", "model.safetensors"}, "nothing was trained: no model, no model card"

    with pytest.raises(ValueError, match="folder of --model_name_or_path"):
        run(model_dir, "--model_name_or_path", str(model_dir), "--do_train", "false", *split_flags("eval", files["val"]))
    assert snapshot(model_dir) == before


def test_test_dev_questions_get_a_prediction_each_with_the_test2015_images(trained, files, tmp_path):
    model_dir, _ = trained
    test_dev = files["test-dev"]
    metrics = run(
        tmp_path, "--model_name_or_path", str(model_dir), "--do_train", "false",
        *split_flags("eval", test_dev, ("questions", "images")),
    )
    assert metrics == {}, "unlabelled questions are predicted, not scored"
    assert not (tmp_path / "eval_results.json").exists()
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert [row["question_id"] for row in predictions] == question_ids(test_dev)
    assert all(set(row) == {"question_id", "answer"} for row in predictions)
    # Scored here only, against annotations the script never saw: the answers are about the right images.
    assert rescore(predictions, test_dev["annotations"])["overall"] > 80


# ---------------------------------------------------------------------------------------------
# Other data: a recipe plus the user's files, a `datasets` source, the shapes data
# ---------------------------------------------------------------------------------------------


def test_a_recipe_with_the_users_files_trains_on_those_files(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where demo.yaml's data/shapes would be made
    run(
        tmp_path / "out", DEMO, *official_flags(files), "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "64",
    )
    assert not (tmp_path / "data").exists(), "the recipe's shapes data was neither made nor used"
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [row["question_id"] for row in predictions] == question_ids(files["val"])
    card = (tmp_path / "out" / "README.md").read_text()
    recipe_layers = yaml.safe_load(Path(DEMO).read_text())["fusion_layers"]
    assert "v2_OpenEnded_mscoco_train2014_questions.json" in card and f"| fusion_layers | {recipe_layers} |" in card


def contract_rows(paths: dict) -> list[dict]:
    dataset = load_vqa_files(paths["questions"], paths["annotations"], paths["images"])
    return [
        {"image": row["image"]["path"], "question": row["question"], "answer": row["multiple_choice_answer"]}
        for row in dataset
    ]


def test_a_datasets_source_with_only_image_question_and_answer(files, tmp_path):
    splits = {split: contract_rows(files[name]) for split, name in (("train", "train"), ("validation", "val"))}
    source = datasets.DatasetDict(
        {split: datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()) for split, rows in splits.items()}
    )
    source.save_to_disk(str(tmp_path / "source"))
    metrics = run(
        tmp_path / "out", "--preset", "tiny", "--dataset_name", str(tmp_path / "source"), "--answer_column", "answer",
        "--max_steps", "4", "--per_device_train_batch_size", "8",
    )
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [row["question_id"] for row in predictions] == list(range(len(splits["validation"])))
    exact = [row["answer"] == truth["answer"] for row, truth in zip(predictions, splits["validation"])]
    assert metrics["eval_vqa_accuracy"] == round(100 * sum(exact) / len(exact), 2)
    assert [name for name in metrics if "vqa_accuracy" in name] == ["eval_vqa_accuracy"], "no types, no per-type scores"


def test_same_seed_same_metrics_on_the_shapes_data(tmp_path):
    def shapes_run(name: str) -> dict:
        metrics = run(
            tmp_path / name, DEMO, "--synthetic_data_dir", str(tmp_path / "shapes"), "--max_steps", "4",
            "--synthetic_train_images", "60", "--synthetic_eval_images", "8", "--per_device_train_batch_size", "8",
        )
        return {k: v for k, v in metrics.items() if not any(t in k for t in ("runtime", "per_second", "_time"))}

    first = shapes_run("first")
    assert first["eval_samples"] == 8 * 3
    assert shapes_run("second") == first


# ---------------------------------------------------------------------------------------------
# Label smoothing, generation settings, saving first, pushing
# ---------------------------------------------------------------------------------------------


def test_label_smoothing_trains(files, tmp_path):
    def train_loss(name: str, *flags: str) -> float:
        run(tmp_path / name, "--preset", "tiny", *split_flags("train", files["train"]), "--max_steps", "4",
            "--per_device_train_batch_size", "8", *flags)
        assert json.loads((tmp_path / name / "trainer_state.json").read_text())["global_step"] == 4
        return json.loads((tmp_path / name / "train_results.json").read_text())["train_loss"]

    plain, smoothed = train_loss("plain"), train_loss("smoothed", "--label_smoothing_factor", "0.1")
    assert math.isfinite(smoothed) and abs(smoothed - plain) > 1e-3


@pytest.fixture
def untrained_model(tiny_parts, tmp_path) -> Path:
    """A model as `from_pretrained_components` makes it, saved with its processor: it answers with random
    tokens until its length limit."""
    torch.manual_seed(0)
    folder = tmp_path / "untrained"
    train_hf.VqaFusionForConditionalGeneration.from_pretrained_components(**tiny_parts).save_pretrained(folder)
    train_hf.VqaFusionProcessor.from_pretrained_components(**tiny_parts).save_pretrained(folder)
    return folder


def test_generation_settings_are_the_users(untrained_model, files, tmp_path, capfd, monkeypatch):
    def answers(name: str, *flags: str) -> list[str]:
        run(tmp_path / name, "--model_name_or_path", str(untrained_model), *split_flags("eval", files["val"]),
            "--max_eval_samples", "24", *flags)
        return [row["answer"] for row in json.loads((tmp_path / name / "predictions.json").read_text())]

    def cut_short(answers: list[str], full: list[str]) -> bool:
        """Greedy answers stopped after fewer tokens: each a prefix of the full answer, some shorter."""
        pairs = list(zip(answers, full, strict=True))
        return all(whole.startswith(part) for part, whole in pairs) and any(len(p) < len(w) for p, w in pairs)

    default = answers("default")
    assert cut_short(answers("short", "--generation_max_length", "3"), default)  # the start token and two more
    generate = train_hf.VqaFusionForConditionalGeneration.generate
    beams = []

    def spy(self, *args, **kwargs):
        beams.append(kwargs.get("num_beams", self.generation_config.num_beams))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(train_hf.VqaFusionForConditionalGeneration, "generate", spy)
    assert len(answers("beams", "--generation_num_beams", "3")) == 24
    assert set(beams) == {3}
    # A model saved with a max_new_tokens (as before) still takes the user's length.
    config = json.loads((untrained_model / "generation_config.json").read_text())
    (untrained_model / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 10}))
    assert cut_short(answers("old", "--generation_max_length", "3"), default)
    assert "max_new_tokens" not in capfd.readouterr().err


def test_the_trained_model_is_saved_before_evaluation(files, tmp_path):
    val = files["val"]
    images = tmp_path / "val2014"
    shutil.copytree(val["images"], images)
    broken = sorted(images.iterdir())[-1]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated JPEG: found only when decoded, at evaluation
    with pytest.raises(VqaImageError, match=broken.name):
        run(tmp_path / "out", "--preset", "tiny", *split_flags("train", files["train"]),
            *split_flags("eval", {**val, "images": images}), "--max_steps", "2", "--per_device_train_batch_size", "8")
    saved = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "processor_config.json", "tokenizer.json", "trainer_state.json"} <= saved
    AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True)


def test_push_to_hub_leaves_out_the_tiny_components(files, tmp_path, monkeypatch):
    uploads = []

    class Hub:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, *, folder_path, ignore_patterns=None, **kwargs):
            names = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
            uploads.append(set(filter_repo_objects(names, ignore_patterns=ignore_patterns)))
            done = Future()
            done.set_result(None)
            return done

    monkeypatch.setattr(transformers.trainer, "hf_api", Hub)
    run(tmp_path / "out", "--preset", "tiny", *official_flags(files), "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--push_to_hub", "true", "--hub_model_id", "me/circles")
    assert (tmp_path / "out" / "_tiny_components" / "decoder" / "config.json").is_file()
    assert {"model.safetensors", "README.md", "predictions.json", "eval_results.json"} <= uploads[-1]
    assert not any(name.startswith("_tiny_components") for upload in uploads for name in upload)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def test_recipe_then_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("fusion: mean\nlearning_rate: 0.01\noutput_dir: somewhere\npreset: tiny\nsynthetic_data_dir: d\n")
    model_args, data_args, training_args = train_hf.parse_arguments([str(recipe), "--learning_rate", "0.5"])
    assert model_args.fusion == "mean" and model_args.preset == "tiny"
    assert training_args.learning_rate == 0.5 and training_args.output_dir == "somewhere"
    assert training_args.do_train and training_args.do_eval and training_args.predict_with_generate
    assert not training_args.remove_unused_columns
    as_json = tmp_path / "recipe.json"
    as_json.write_text(json.dumps({"answer_strategy": "sample", "output_dir": "x", "synthetic_data_dir": "d"}))
    assert train_hf.parse_arguments([str(as_json)])[1].answer_strategy == "sample"


def test_data_on_the_command_line_replaces_the_recipes(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("synthetic_data_dir: d\neval_questions: q.json\neval_images: i\noutput_dir: o\n")
    _, data_args, training_args = train_hf.parse_arguments([str(recipe), "--train_q", "t.json", "--train_a", "a.json",
                                                            "--train_images", "i", "--do_eval", "false"])
    assert (data_args.synthetic_data_dir, data_args.eval_questions, data_args.train_questions) == (None, None, "t.json")
    assert training_args.do_train and not training_args.do_eval


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--synthetic_data_dir", "d", "--dataset_name", "x"], "one source of data"),
        (["--eval_questions", "q", "--eval_images", "i", "--preset", "tiny"], "needs a trained model"),
        (["--train_questions", "q", "--train_images", "i"], "--train_annotations"),
        (["--train_questions", "q", "--train_annotations", "a", "--train_images", "i", "--do_eval", "true"],
         "--do_eval needs evaluation data"),
        (["--output_dir", "o"], "nothing to do"),
        (["--synthetic_data_dir", "d", "--remove_unused_columns", "true"], "remove_unused_columns"),
        (["--synthetic_data_dir", "d", "--predict_with_generate", "false"], "predict_with_generate"),
        (["--model_name_or_path", "m", "--eval_questions", "q", "--eval_images", "i", "--push_to_hub", "true"],
         "push_to_hub"),
        (["--synthetic_data_dir", "d", "--preset", "tiny", "--tiny_vision_encoder", "vgg"], "--tiny_vision_encoder"),
        (["--synthetic_data_dir", "d", "--preset", "tiny", "--tiny_decoder", "gpt-2"], "--tiny_decoder"),
    ],
)
def test_run_modes_that_cannot_work_are_refused_before_anything_runs(argv, message):
    with pytest.raises(ValueError, match=message):
        train_hf.parse_arguments(argv)


@pytest.mark.parametrize(
    "content, message",
    [
        ("learning_rat: 0.1\noutput_dir: x\n", "learning_rat"),
        ("- a\n- b\n", "mapping"),
        ("answer_strategy: vote\noutput_dir: x\nsynthetic_data_dir: d\n", "vote"),
    ],
)
def test_bad_recipe_is_named(tmp_path, content, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    with pytest.raises(ValueError, match=message):
        train_hf.parse_arguments([str(recipe)])


def test_last_complete_checkpoint_skips_unfinished_ones(tmp_path):
    for step, state in ((5, '{"global_step": 5}'), (10, '{"global_step": 10}'), (15, '{"global_st'), (20, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert train_hf.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert train_hf.resolve_resume("last", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    with pytest.raises(ValueError, match="checkpoint-20"):
        train_hf.resolve_resume(str(tmp_path / "checkpoint-20"), str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Real processes: two as one job, resuming after a kill
# ---------------------------------------------------------------------------------------------

# Runs train_hf as the launcher's script, recording what each rank trained on.
RECORDING_SCRIPT = """
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {root!r})
import train_hf

build = train_hf.VqaTrainer.__init__

def recording_init(self, *args, **kwargs):
    build(self, *args, **kwargs)
    collate = self.data_collator

    def record(rows):
        with open(os.path.join({folder!r}, f"rank{{dist.get_rank()}}.jsonl"), "a") as log:
            log.write(json.dumps({{"world_size": dist.get_world_size(), "ids": [r["question_id"] for r in rows]}}) + "\\n")
        return collate(rows)

    self.data_collator = record

train_hf.VqaTrainer.__init__ = recording_init
train_hf.main()
"""


def run_script(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    "accelerate-multi-gpu": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_processes_train_and_evaluate_as_one_job(launcher, files, tmp_path):
    script = tmp_path / "recording_train_hf.py"
    script.write_text(RECORDING_SCRIPT.format(root=str(ROOT), folder=str(tmp_path)))
    output_dir = tmp_path / "out"
    evaluation = [*split_flags("eval", files["val"]), "--max_eval_samples", "30", "--per_device_eval_batch_size", "8"]
    completed = run_script(
        [*LAUNCHERS[launcher], str(script), "--preset", "tiny", *split_flags("train", files["train"]), *evaluation,
         "--max_train_samples", "96", "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
         "--learning_rate", "1e-3", "--eval_strategy", "epoch", "--log_level", "info", "--output_dir",
         str(output_dir), *QUIET],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in completed.stderr

    records = {rank: [json.loads(line) for line in (tmp_path / f"rank{rank}.jsonl").read_text().splitlines()]
               for rank in (0, 1)}
    assert {record["world_size"] for batches in records.values() for record in batches} == {2}
    first_epoch = {rank: [i for record in batches[:12] for i in record["ids"]] for rank, batches in records.items()}
    assert all(len(batches) == 24 for batches in records.values()), "12 steps of batch 4 per epoch on each rank"
    assert not set(first_epoch[0]) & set(first_epoch[1]), "each rank trains on its own shard"
    assert sorted(first_epoch[0] + first_epoch[1]) == sorted(question_ids(files["train"])[:96])

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert [entry["epoch"] for entry in state["log_history"] if "eval_vqa_accuracy" in entry] == [1.0, 2.0]
    with Image.open(output_dir / "training_curves.png") as curves:
        assert curves.size[0] == 3 * 4.5 * 80, "three panels of 4.5 inches at 80 dpi: loss, learning rate, accuracy"
    predictions = json.loads((output_dir / "predictions.json").read_text())
    assert [row["question_id"] for row in predictions] == question_ids(files["val"])[:30]

    # One process, the same saved weights: the same answers and metrics.
    single = run(tmp_path / "single", "--model_name_or_path", str(output_dir), *evaluation)
    assert json.loads((tmp_path / "single" / "predictions.json").read_text()) == predictions
    two = json.loads((output_dir / "eval_results.json").read_text())
    assert {k: v for k, v in single.items() if "vqa_accuracy" in k} == {k: v for k, v in two.items() if "vqa_accuracy" in k}


def test_resume_after_sigkill_continues_from_the_checkpoint(files, tmp_path):
    output_dir = tmp_path / "run"
    command = [
        sys.executable, SCRIPT, "--preset", "tiny", *split_flags("train", files["train"]),
        *split_flags("eval", files["val"]), "--max_eval_samples", "12", "--output_dir", str(output_dir),
        "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "1",
        "--per_device_train_batch_size", "8", *QUIET,
    ]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = output_dir / "checkpoint-4" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists(), "the run ended before its first checkpoint"
    assert not (output_dir / "model.safetensors").exists(), "killed too late to test a resume"
    # A checkpoint cut off while being written: no trainer state.
    (output_dir / "checkpoint-8").mkdir(exist_ok=True)
    (output_dir / "checkpoint-8" / "trainer_state.json").unlink(missing_ok=True)

    completed = run_script(command + ["--resume_from_checkpoint", "last"], cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    logged_losses = [line for line in completed.stdout.splitlines() if line.startswith("{'loss'")]
    assert len(logged_losses) == 12 - 4, "the second process ran steps 5 to 12 only"
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 12
    assert len(json.loads((output_dir / "predictions.json").read_text())) == 12
