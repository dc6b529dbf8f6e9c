"""The web page as a person uses it: `python app.py MODEL` in a subprocess on 127.0.0.1, driven by headless Chromium
through Selenium (upload, type, submit, read the answer and the overlay), and through `gradio_client`. The
model is a tiny one, trained for a few seconds to answer its questions, saved to a folder as the demo is."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from conftest import ANSWERS, QUESTIONS, TEST_SIZES
from modeling_vqa_fusion import VqaFusionForConditionalGeneration
from processing_vqa_fusion import VqaFusionProcessor
from test_modeling import overfit
from tiny_components import build_tiny_components

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "examples" / "shapes_2.png"
QUESTION = "What color is the square?"
START_TIMEOUT = 90
ANSWER_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(model: str | Path) -> Iterator[str]:
    """`python app.py MODEL` on 127.0.0.1 at a free port, until the block ends; yields its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), str(model)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"app.py did not start:\n{process.communicate()[0]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        process.wait(timeout=30)


def ask_in_browser(url: str, image: Path, question: str, screenshot: Path) -> tuple[str, int]:
    """Upload `image`, type `question`, press Answer in headless Chromium; returns the answers' text and how many
    overlay images the gallery shows, after saving a screenshot."""
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--window-size=1280,1000", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, ANSWER_TIMEOUT)
        file_input = (By.CSS_SELECTOR, "#image input[type=file]")
        upload = wait.until(expected_conditions.presence_of_element_located(file_input))
        upload.send_keys(str(image))
        wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        driver.find_element(By.CSS_SELECTOR, "#questions textarea").send_keys(question)
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: "→" in d.find_element(By.ID, "answers").text)
        overlays = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlays img"))
        text = driver.find_element(By.ID, "answers").text
        driver.save_screenshot(str(screenshot))
        return text, len(overlays)
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, VqaFusionForConditionalGeneration, VqaFusionProcessor]:
    """A tiny model taught to answer "red" about the example image, saved like the demo's."""
    folder = tmp_path_factory.mktemp("app")
    parts = build_tiny_components(folder / "parts", QUESTIONS, ANSWERS, TEST_SIZES)
    torch.manual_seed(0)
    model = VqaFusionForConditionalGeneration.from_pretrained_components(**parts, fusion="sequence")
    processor = VqaFusionProcessor.from_pretrained_components(**parts)
    image = Image.open(EXAMPLE).convert("RGB")
    overfit(model, processor(images=[image], text=[QUESTION], answers=["red"]), steps=150)
    model.eval().save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model", model, processor


def direct_answer(model, processor, image: Image.Image, question: str) -> str:
    """What the model answers, computed here with `generate` and the app's three beams."""
    with torch.no_grad():
        ids = model.generate(**processor(images=[image], text=[question]), num_beams=3)
    return processor.batch_decode(ids)[0]


@pytest.fixture(scope="module")
def app_url(saved_model) -> Iterator[str]:
    with serving(saved_model[0]) as url:
        yield url


def test_browser_shows_the_models_answer_and_the_overlay(saved_model, app_url, tmp_path):
    _, model, processor = saved_model
    expected = direct_answer(model, processor, Image.open(EXAMPLE).convert("RGB"), QUESTION)
    assert expected == "red", "the tiny model learned its answer (else the page's text proves little)"
    screenshot = tmp_path / "app.png"
    text, overlays = ask_in_browser(app_url, EXAMPLE, QUESTION, screenshot)
    assert text.splitlines()[0] == f"{QUESTION} → {expected}", "the answer line, exactly"
    assert overlays == 1
    assert Image.open(screenshot).size[0] > 0


def test_client_answers_several_questions_and_returns_one_overlay_each(saved_model, app_url):
    _, model, processor = saved_model
    questions = [QUESTION, "How many triangles are there?"]
    markdown, gallery, shading = Client(app_url, verbose=False).predict(
        handle_file(str(EXAMPLE)), "\n".join(questions) + "\n\n", api_name="/answer"
    )
    image = Image.open(EXAMPLE).convert("RGB")
    for question in questions:
        assert f"**{question}** → **{direct_answer(model, processor, image, question) or '(empty)'}**" in markdown
    assert len(gallery) == 2
    assert Image.open(gallery[0]["image"]).size == image.size, "the overlay is the image's size"
    tokens = [item["token"].strip() for item in shading if item["class_or_confidence"] is not None]
    assert tokens[:7] == ["[CLS]", "what", "color", "is", "the", "square", "?"]


@pytest.mark.parametrize(
    "upload, questions, message",
    [
        (None, QUESTION, "Upload an image first"),
        (EXAMPLE, "  \n ", "Type a question"),
        (Path(__file__), QUESTION, r"cannot identify image file .*test_app\.py"),
    ],
)
def test_bad_input_gets_a_message(app_url, upload, questions, message):
    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match=message):
        client.predict(handle_file(str(upload)) if upload else None, questions, api_name="/answer")


def test_missing_demo_model_says_how_to_make_it(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "accelerate launch train_hf.py" in result.stderr and "Traceback" not in result.stderr
