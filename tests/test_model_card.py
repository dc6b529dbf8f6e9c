"""Training curves drawn from the Trainer's log history, and a model card whose front matter the Hub's own parser
reads back as evaluation results, with the components by hub id and no local path."""

from types import SimpleNamespace

import pytest
from huggingface_hub import ModelCard
from PIL import Image

from model_card import curve_series, plot_training_curves, render_model_card

# As `Trainer.state.log_history` holds it: training logs, an evaluation during training, the run's summary.
LOG_HISTORY = [
    {"loss": 4.0, "grad_norm": 3.0, "learning_rate": 3e-4, "epoch": 0.5, "step": 10},
    {"eval_loss": 2.0, "eval_vqa_accuracy": 40.0, "eval_vqa_accuracy_yes_no": 60.0, "eval_vqa_accuracy_other": 20.0,
     "epoch": 0.5, "step": 10},
    {"loss": 2.5, "grad_norm": 2.0, "learning_rate": 1e-4, "epoch": 1.0, "step": 20},
    {"eval_loss": 1.0, "eval_vqa_accuracy": 70.0, "eval_vqa_accuracy_yes_no": 90.0, "eval_vqa_accuracy_other": 50.0,
     "epoch": 1.0, "step": 20},
    {"train_runtime": 12.0, "train_loss": 3.2, "epoch": 1.0, "step": 20},
]
METRICS = {
    "eval_vqa_accuracy": 70.0, "eval_vqa_accuracy_yes_no": 90.0, "eval_vqa_accuracy_number": 65.5,
    "eval_vqa_accuracy_other": 50.0, "eval_loss": 1.0, "eval_samples": 900,
}


def test_curve_series_are_the_logged_loss_learning_rate_and_accuracies():
    assert curve_series(LOG_HISTORY) == {
        "loss": [(10, 4.0), (20, 2.5)],
        "learning_rate": [(10, 3e-4), (20, 1e-4)],
        "eval_vqa_accuracy": [(10, 40.0), (20, 70.0)],
        "eval_vqa_accuracy_yes_no": [(10, 60.0), (20, 90.0)],
        "eval_vqa_accuracy_other": [(10, 20.0), (20, 50.0)],
    }


@pytest.mark.parametrize("history, panels", [(LOG_HISTORY, 3), (LOG_HISTORY[::2], 2)])
def test_curves_are_a_png_with_a_panel_for_accuracy_only_when_evaluated(tmp_path, history, panels):
    path = plot_training_curves(history, tmp_path / "curves.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        # 4.5 x 3.4 inches per panel at 80 dpi.
        assert image.size == (round(4.5 * panels * 80), round(3.4 * 80))


def arguments(tmp_path, **data):
    model_args = SimpleNamespace(
        preset=None, model_name_or_path=None, initializer_range=0.1, freeze="none", lora_r=0,
    )
    data_args = SimpleNamespace(
        **{
            "synthetic_data_dir": None, "dataset_name": None, "eval_split": "validation", "train_split": "train",
            "answer_strategy": "consensus", "train_questions": None, "eval_questions": None,
            "synthetic_train_images": 4000, **data,
        }
    )
    training_args = SimpleNamespace(
        hub_model_id=None, output_dir=str(tmp_path / "my-vqa"), learning_rate=3e-4,
        lr_scheduler_type=SimpleNamespace(value="cosine"), warmup_steps=0, per_device_train_batch_size=8,
        gradient_accumulation_steps=1, world_size=1, num_train_epochs=1, max_steps=20, label_smoothing_factor=0.0,
        bf16=False, fp16=False, seed=0,
    )
    return model_args, data_args, training_args


def test_card_front_matter_reads_back_as_evaluation_results(make_model, tmp_path):
    model = make_model()
    local = tmp_path / "my_local_vit"
    local.mkdir()
    model.config.question_encoder._name_or_path = "distilbert-base-uncased"
    model.config.vision_encoder._name_or_path = str(local)
    model.config.decoder._name_or_path = "gpt2"
    card_text = render_model_card(
        *arguments(tmp_path, dataset_name="HuggingFaceM4/VQAv2"), model, METRICS, "all", curves=True
    )
    card = ModelCard(card_text)
    results = {result.metric_config or "overall": result for result in card.data.eval_results}
    assert {name: result.metric_value for name, result in results.items()} == {
        "overall": 70.0, "yes_no": 90.0, "number": 65.5, "other": 50.0,
    }
    for result in results.values():
        assert (result.task_type, result.metric_type) == ("visual-question-answering", "vqa_accuracy")
        assert (result.dataset_type, result.dataset_split) == ("HuggingFaceM4/VQAv2", "validation")
    assert card.data.base_model == ["distilbert-base-uncased", "gpt2"], "hub ids only: a local folder is no base model"
    assert str(tmp_path) not in card_text and "my_local_vit" in card_text
    assert "![training curves](training_curves.png)" in card_text


def test_card_of_the_shapes_demo_names_its_held_out_split(make_model, tmp_path):
    args = arguments(tmp_path, synthetic_data_dir="data/shapes")
    card = ModelCard(render_model_card(*args, make_model(), METRICS, "all"))
    assert {result.dataset_split for result in card.data.eval_results} == {"shapes_val"}
    assert "training_curves.png" not in card.text


def test_card_of_a_run_without_evaluation_has_no_results(make_model, tmp_path):
    args = arguments(tmp_path, train_questions=str(tmp_path / "questions.json"))
    card = ModelCard(render_model_card(*args, make_model(), {}, "all"))
    assert card.data.eval_results is None and "Not measured in this training run." in card.text
