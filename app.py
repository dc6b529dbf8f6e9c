"""A web page for a trained vqa-fusion model: ask questions about an image, see the answers, the beam search's
alternatives with their probabilities, where the decoder read in the image and how much each question word
weighed (`attention_maps.py` says how these are computed and what they do not mean).

    python app.py                 # the demo model, outputs/demo (made by `accelerate launch train_hf.py`)
    python app.py my/model        # a saved folder or a hub id

Hugging Face Spaces run `app.py` as it is; GRADIO_SERVER_NAME and GRADIO_SERVER_PORT choose where it listens.
"""

import sys
from pathlib import Path

import gradio as gr
import matplotlib
import numpy as np
from PIL import Image, UnidentifiedImageError

from attention_maps import AnswerAttention, answer_with_attention
from modeling_vqa_fusion import VqaFusionForConditionalGeneration
from processing_vqa_fusion import VqaFusionProcessor

DEFAULT_MODEL = "outputs/demo"
EXAMPLES = Path(__file__).resolve().parent / "assets" / "examples"
EXAMPLE_QUESTIONS = "\n".join(
    (
        "What color is the object in the top left corner?",
        "What shape is in the bottom right corner?",
        "How many circles are there?",
    )
)
ALTERNATIVES = 3
MAX_QUESTIONS = 8
HEAT_OPACITY = 0.6


def load(name_or_path: str) -> tuple[VqaFusionForConditionalGeneration, VqaFusionProcessor]:
    """The model and processor of a saved folder or hub id; a missing default folder says how to make it."""
    if name_or_path == DEFAULT_MODEL and not Path(DEFAULT_MODEL).is_dir():
        sys.exit(
            f"no model in {DEFAULT_MODEL}: train the demo first with `accelerate launch train_hf.py`, "
            "or give a model: python app.py MODEL"
        )
    try:
        model = VqaFusionForConditionalGeneration.from_pretrained(name_or_path).eval()
        # This repository's classes load the folder: its own copy of the code is never run.
        processor = VqaFusionProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    except OSError as error:
        sys.exit(f"cannot load a vqa-fusion model from {name_or_path}: {error}")
    return model, processor


def overlay(image: Image.Image, heatmap: np.ndarray) -> Image.Image:
    """The image with the heatmap `(height, width)` drawn over it in matplotlib's `inferno` colours, opaque where
    the heat is highest."""
    scaled = heatmap / heatmap.max()
    colours = matplotlib.colormaps["inferno"](scaled)[..., :3]
    alpha = (HEAT_OPACITY * scaled)[..., None]
    blended = (1 - alpha) * np.asarray(image, dtype=np.float32) / 255 + alpha * colours
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def read_inputs(image_path: str | None, questions: str) -> tuple[Image.Image, list[str]]:
    """The uploaded image and the questions, one per line; bad input raises `gr.Error` with what is wrong."""
    if not image_path:
        raise gr.Error("Upload an image first (or pick an example).")
    try:
        image = Image.open(image_path)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise gr.Error(f"{Path(image_path).name} is not an image this page can read ({error}).") from error
    lines = [line.strip() for line in (questions or "").splitlines() if line.strip()]
    if not lines:
        raise gr.Error("Type a question (several: one per line).")
    if len(lines) > MAX_QUESTIONS:
        raise gr.Error(f"{len(lines)} questions: ask at most {MAX_QUESTIONS} at once.")
    return image.convert("RGB"), lines


def describe(results: list[AnswerAttention]) -> str:
    """The answers as Markdown: each question, its answer and the alternatives with their probabilities."""
    blocks = []
    for result in results:
        alternatives = ", ".join(f"{text or '(empty)'} {probability:.1%}" for text, probability in result.alternatives)
        blocks.append(
            f"**{result.question}** → **{result.answer or '(empty)'}**  \n"
            f"beam search: {alternatives}; attention on the image: {result.image_share:.0%}"
        )
    return "\n\n".join(blocks)


def question_shading(results: list[AnswerAttention]) -> list[tuple[str, float | None]]:
    """Question tokens with their weight relative to the heaviest token of the same question, for
    `gr.HighlightedText`; a line break between questions."""
    shading = []
    for result in results:
        top = max(float(result.question_weights.max()), 1e-12)
        tokens = zip(result.question_tokens, result.question_weights)
        shading += [(token + " ", float(weight) / top) for token, weight in tokens]
        shading.append(("\n", None))
    return shading


def make_answer(model: VqaFusionForConditionalGeneration, processor: VqaFusionProcessor):
    def answer(image_path: str | None, questions: str):
        image, lines = read_inputs(image_path, questions)
        try:
            results = answer_with_attention(
                model, processor, [image] * len(lines), lines, num_alternatives=ALTERNATIVES
            )
        except ValueError as error:
            raise gr.Error(str(error)) from error
        gallery = [(overlay(image, result.heatmap), f"{result.question} → {result.answer}") for result in results]
        return describe(results), gallery, question_shading(results)

    return answer


def build_demo(model: VqaFusionForConditionalGeneration, processor: VqaFusionProcessor) -> gr.Blocks:
    with gr.Blocks(title="vqa-fusion") as demo:
        gr.Markdown(
            "# vqa-fusion\nAsk questions about an image. The heatmap is the decoder's attention on the image while "
            "it generated the answer, averaged over layers and heads: a hint of where it read, not an explanation."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image", elem_id="image")
                questions = gr.Textbox(lines=3, label="Questions, one per line", elem_id="questions")
                submit = gr.Button("Answer", variant="primary", elem_id="submit")
            with gr.Column():
                answers = gr.Markdown(elem_id="answers")
                overlays = gr.Gallery(label="Where the decoder read", columns=2, elem_id="overlays")
                shading = gr.HighlightedText(label="Question tokens by attention weight", elem_id="tokens")
        examples = sorted(EXAMPLES.glob("*.png"))
        if examples:
            gr.Examples([[str(path), EXAMPLE_QUESTIONS] for path in examples], inputs=[image, questions])
        submit.click(make_answer(model, processor), [image, questions], [answers, overlays, shading], api_name="answer")
    return demo


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit("usage: python app.py [MODEL]  (a saved folder or hub id; default outputs/demo)")
    model, processor = load(argv[0] if argv else DEFAULT_MODEL)
    # show_error: an upload that is no image fails in Gradio's own preprocessing, whose message ("cannot identify
    # image file ...") then reaches the page instead of a generic "Error".
    build_demo(model, processor).launch(show_error=True)


if __name__ == "__main__":
    main(sys.argv[1:])
