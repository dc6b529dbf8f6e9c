"""The pictures in the README and the app's example images, made with the project's own code.

    python docs/make_figures.py examples                  # assets/examples/*.png from the shapes data's held-out split
    python docs/make_figures.py heatmap outputs/demo      # docs/heatmap.png: one corner question's attention
    python docs/make_figures.py screenshot outputs/demo   # docs/app.png: the app in headless Chromium
"""

import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from app import EXAMPLES, load, overlay  # noqa: E402
from attention_maps import answer_with_attention  # noqa: E402
from shapes_data import make_shapes_vqa  # noqa: E402

EXAMPLE_COUNT = 4
FIGURES = ROOT / "docs"
HEATMAP_QUESTION = "What color is the object in the top left corner?"
# An example with objects of four colours, one of them in the top left corner.
FIGURE_IMAGE = EXAMPLES / "shapes_3.png"
SCREENSHOT_WIDTH = 960


def write_examples() -> None:
    """The first held-out images of the demo's shapes data, as PNG: the held-out split's images depend only on the
    generator's seed and their position, so a dataset of one training image gives the same ones."""
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        files = make_shapes_vqa(folder, num_train_images=1, num_val_images=EXAMPLE_COUNT)
        for path in sorted(Path(files["eval_images"]).glob("*.jpg")):
            Image.open(path).save(EXAMPLES / f"shapes_{int(path.stem.rsplit('_', 1)[-1])}.png")


def write_heatmap(model_path: str) -> None:
    """The attention of one corner question on an example image, upscaled 4x, beside the image."""
    model, processor = load(model_path)
    image = Image.open(FIGURE_IMAGE).convert("RGB")
    [result] = answer_with_attention(model, processor, [image], [HEATMAP_QUESTION])
    size = (image.width * 4, image.height * 4)
    pair = Image.new("RGB", (size[0] * 2, size[1]))
    pair.paste(image.resize(size, Image.NEAREST), (0, 0))
    pair.paste(overlay(image, result.heatmap).resize(size, Image.NEAREST), (size[0], 0))
    pair.save(FIGURES / "heatmap.png")
    print(f"{HEATMAP_QUESTION} -> {result.answer}; heat in the top left quadrant: "
          f"{result.heatmap[: image.height // 2, : image.width // 2].sum():.1%}")


def write_screenshot(model_path: str) -> None:
    from test_app import ask_in_browser, serving  # the browser test's own steps

    with serving(model_path) as url:
        ask_in_browser(url, FIGURE_IMAGE, HEATMAP_QUESTION, FIGURES / "app.png")
    screenshot = Image.open(FIGURES / "app.png")
    height = round(screenshot.height * SCREENSHOT_WIDTH / screenshot.width)
    small = screenshot.convert("RGB").resize((SCREENSHOT_WIDTH, height), Image.LANCZOS).quantize(colors=128)
    small.save(FIGURES / "app.png", optimize=True)


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["help"]
    if command == "examples":
        write_examples()
    elif command == "heatmap" and len(rest) == 1:
        write_heatmap(rest[0])
    elif command == "screenshot" and len(rest) == 1:
        write_screenshot(rest[0])
    else:
        sys.exit(__doc__)
