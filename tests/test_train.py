"""train_hf.py end to end on the offline shapes dataset: learning, outputs, launching, resuming, seeds."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor

import train_hf
from vqa_data import VqaCollator, load_vqa_files, make_shapes_vqa
from vqa_metric import vqa_accuracy

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "train_hf.py")
DEMO = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    make_shapes_vqa(folder, num_train_images=600, num_val_images=40, seed=0)
    return folder


def run_args(shapes: Path, output_dir: Path, *flags: str) -> list[str]:
    """The demo recipe on the small shapes dataset, made quick."""
    return [
        DEMO,
        "--synthetic_data_dir", str(shapes),
        "--synthetic_train_images", "600",
        "--synthetic_eval_images", "40",
        "--output_dir", str(output_dir),
        "--show_examples", "0",
        "--disable_tqdm", "true",
        *flags,
    ]


@pytest.fixture(scope="module")
def trained_run(shapes, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run")
    metrics = train_hf.main(run_args(shapes, output_dir, "--max_steps", "300", "--learning_rate", "1e-3"))
    return output_dir, metrics


def majority_answer_accuracy(shapes: Path) -> float:
    """Accuracy of always giving the most common training answer: what a model blind to everything scores."""
    files = make_shapes_vqa(shapes, num_train_images=600, num_val_images=40, seed=0)
    train = load_vqa_files(files["train_questions"], files["train_annotations"], files["train_images"])
    evaluation = load_vqa_files(files["eval_questions"], files["eval_annotations"], files["eval_images"])
    majority = Counter(train["multiple_choice_answer"]).most_common(1)[0][0]
    return vqa_accuracy([majority] * len(evaluation), evaluation["answers"])["vqa_accuracy"]


def test_tiny_run_learns_well_above_the_majority_answer(trained_run, shapes):
    _, metrics = trained_run
    baseline = majority_answer_accuracy(shapes)
    assert baseline < 20
    assert metrics["eval_vqa_accuracy"] > baseline + 8
    assert {"eval_vqa_accuracy_yes_no", "eval_vqa_accuracy_number", "eval_vqa_accuracy_other"} <= set(metrics)


def test_run_writes_every_promised_output(trained_run, shapes):
    output_dir, metrics = trained_run
    names = {path.name for path in output_dir.iterdir()}
    assert {
        "config.json", "model.safetensors", "generation_config.json", "processor_config.json", "tokenizer.json",
        "question_tokenizer", "configuration_vqa_fusion.py", "modeling_vqa_fusion.py", "processing_vqa_fusion.py",
        "eval_results.json", "predictions.json", "README.md",
    } <= names
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["eval_vqa_accuracy"] == metrics["eval_vqa_accuracy"]

    questions = json.loads((shapes / "v2_OpenEnded_mscoco_shapes_val_questions.json").read_text())["questions"]
    predictions = json.loads((output_dir / "predictions.json").read_text())
    assert [row["question_id"] for row in predictions] == [q["question_id"] for q in questions]
    assert all(isinstance(row["answer"], str) and set(row) == {"question_id", "answer"} for row in predictions)

    card = (output_dir / "README.md").read_text()
    assert f"| eval_vqa_accuracy | {metrics['eval_vqa_accuracy']} |" in card
    assert "sequence fusion" in card and "trust_remote_code=True" in card


def test_saved_run_reloads_and_reproduces_its_predictions(trained_run, shapes):
    output_dir, _ = trained_run
    model = AutoModel.from_pretrained(output_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    files = make_shapes_vqa(shapes, num_train_images=600, num_val_images=40, seed=0)
    evaluation = load_vqa_files(files["eval_questions"], files["eval_annotations"], files["eval_images"])
    rows = [evaluation[i] for i in range(12)]
    batch = VqaCollator(processor, answer_strategy=None)(rows)
    with torch.no_grad():
        answers = processor.batch_decode(model.generate(**batch))
    predictions = json.loads((output_dir / "predictions.json").read_text())
    assert answers == [row["answer"] for row in predictions[:12]]


def test_config_file_then_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("fusion: mean\nlearning_rate: 0.01\noutput_dir: somewhere\npreset: tiny\n")
    model_args, data_args, training_args = train_hf.parse_arguments([str(recipe), "--learning_rate", "0.5"])
    assert model_args.fusion == "mean" and model_args.preset == "tiny"
    assert training_args.learning_rate == 0.5 and training_args.output_dir == "somewhere"
    as_json = tmp_path / "recipe.json"
    as_json.write_text(json.dumps({"answer_strategy": "sample", "output_dir": "x"}))
    assert train_hf.parse_arguments([str(as_json)])[1].answer_strategy == "sample"


@pytest.mark.parametrize(
    "content, message",
    [
        ("learning_rat: 0.1\noutput_dir: x\n", "learning_rat"),
        ("- a\n- b\n", "mapping"),
        ("answer_strategy: vote\noutput_dir: x\n", "vote"),
    ],
)
def test_bad_config_file_is_named(tmp_path, content, message):
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


def quick_flags(*extra: str) -> list[str]:
    return ["--synthetic_train_images", "60", "--synthetic_eval_images", "8", "--per_device_train_batch_size", "8", *extra]


def run_script(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_process_accelerate_launch_on_cpu(tmp_path):
    output_dir = tmp_path / "ddp"
    completed = run_script(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, DEMO,
         "--synthetic_data_dir", str(tmp_path / "shapes"), "--output_dir", str(output_dir), "--max_steps", "4",
         *quick_flags("--show_examples", "0")],
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    questions = json.loads((tmp_path / "shapes" / "v2_OpenEnded_mscoco_shapes_val_questions.json").read_text())
    predictions = json.loads((output_dir / "predictions.json").read_text())
    assert sorted(row["question_id"] for row in predictions) == sorted(q["question_id"] for q in questions["questions"])


def test_resume_after_sigkill_reaches_the_same_final_step(tmp_path):
    output_dir = tmp_path / "run"
    command = [
        sys.executable, SCRIPT, DEMO, "--synthetic_data_dir", str(tmp_path / "shapes"), "--output_dir",
        str(output_dir), "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4", "--show_examples", "0",
        *quick_flags(),
    ]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = output_dir / "checkpoint-4" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.exists(), "the run ended before its first checkpoint"
    assert not (output_dir / "model.safetensors").exists(), "killed too late to test a resume"
    # A checkpoint cut off while being written: no trainer state.
    (output_dir / "checkpoint-8").mkdir(exist_ok=True)
    (output_dir / "checkpoint-8" / "trainer_state.json").unlink(missing_ok=True)

    completed = run_script(command + ["--resume_from_checkpoint", "last"], cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 12
    predictions = json.loads((output_dir / "predictions.json").read_text())
    assert len(predictions) == 8 * 3
    AutoModel.from_pretrained(output_dir, trust_remote_code=True)


def test_same_seed_same_metrics(tmp_path):
    def run(name: str) -> dict:
        metrics = train_hf.main(
            [DEMO, "--synthetic_data_dir", str(tmp_path / "shapes"), "--output_dir", str(tmp_path / name),
             "--max_steps", "6", "--show_examples", "0", "--disable_tqdm", "true", *quick_flags()]
        )
        return {k: v for k, v in metrics.items() if not any(t in k for t in ("runtime", "per_second", "_time"))}

    assert run("first") == run("second")
