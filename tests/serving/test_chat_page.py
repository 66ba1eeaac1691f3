"""The served chat page in a real headless browser (Debian's chromium + chromedriver, driven by selenium), on a
tiny model briefly trained on synthetic grounding by the real trainer, served by the real CLI
(`python -m qwenvl_jax.serve --checkpoint=<run dir>`: preset, image size, tokenizer and chat format come from
the run's config.json).

The model is trained for 200 steps only (seconds; the run is dominated by start-up and compiles): enough to
answer `<ref>the red circle</ref>` with a well-formed `<box>(x1,y1),(x2,y2)</box>` (not to put it in the right
place), which is what the page has to draw.
"""
import base64
import pathlib
import shutil
import sys

import pytest
import requests
from PIL import Image

from qwenvl_jax.data.synthetic import synthetic_record
from tests import background
from tests.serving.conftest import serve_cli
from tests.training import helpers

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = pytest.mark.slow  # training + serving the model: minutes on a 2-core CPU
STEPS = 200


def _grounding_training(folder):
  """A stage-2 run of the tiny preset at 56 px trained on synthetic grounding only (one shape per scene), in
  `<folder>/run`: registered in tests/background.py, it starts with the session at the lowest CPU priority."""
  mixture = helpers.load_stage_config(2).data.mixture
  flags = helpers.small_flags(2, folder / "run", total_steps=STEPS, log_every=STEPS // 2, **{
      "checkpoint.every": STEPS, "optimizer.warmup_steps": 5, "optimizer.lr": 3e-3, "data.read_threads": 1,
      "data.synthetic_max_shapes": 1, **{f"data.mixture.{t}": float(t == "grounding") for t in mixture}})
  return [background.Command([sys.executable, "-m", "qwenvl_jax.train"] + flags,
                             helpers.subprocess_env(devices=1, default_llvm_level=True))]


background.register(__name__, "grounding_run", _grounding_training)


@pytest.fixture(scope="session")
def grounding_run(tmp_path_factory) -> pathlib.Path:
  """The run directory of `_grounding_training`, once it has finished."""
  job = background.job(__name__, "grounding_run", tmp_path_factory.mktemp)
  (done,) = job.result()
  assert done.returncode == 0, done.stderr[-3000:]
  return job.folder / "run"


@pytest.fixture(scope="session")
def served_run(grounding_run, tmp_path_factory):
  """`python -m qwenvl_jax.serve --checkpoint=<run>` on a free port; yields its base URL once /health is ok."""
  flags = [f"--checkpoint={grounding_run}", "--dtype=float32", "--num_slots=1", "--context=128", "--buckets=64",
           "--max_images=1", "--prefill_batch=1", "--max_tokens_limit=64"]
  with serve_cli(flags, tmp_path_factory.mktemp("serve_log")) as url:
    yield url


def test_serve_cli_takes_everything_from_the_run_directory(served_run):
  models = requests.get(served_run + "/v1/models", timeout=10).json()
  assert [m["id"] for m in models["data"]] == ["tiny"]  # the run's preset
  health = requests.get(served_run + "/health", timeout=10).json()
  assert health["slots"] == 1 and health["compilations"]["lowerings_after_warmup"] == 0


@pytest.fixture()
def scene(tmp_path):
  """(path of a 224 px synthetic one-shape scene, its grounding query `<ref>the <colour> <shape></ref>`)."""
  record = synthetic_record(7, task="grounding", image_size=224, seed=99, max_shapes=1)
  path = tmp_path / "scene.png"
  image = record.images[0]
  (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
  return path, record.turns[0][1].replace("<img></img>", "")


@pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                    reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
def test_chat_page_streams_the_answer_and_draws_its_boxes(served_run, scene, tmp_path):
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel

  image_path, query = scene
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,900"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  try:
    driver.get(served_run + "/")
    driver.find_element(By.ID, "file").send_keys(str(image_path))
    driver.find_element(By.ID, "prompt").send_keys(query)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, 120).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                     in ("done", "error"))
    answer = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
    driver.save_screenshot(str(tmp_path / "chat_page.png"))
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", answer
    assert "<box>" in answer, answer
    drawn = driver.execute_script("return window.drawnBoxes")
    # The same request through the API gives the boxes the page drew (pixels of the 224 px image).
    url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    reply = requests.post(served_run + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": query}]}],
        "max_tokens": 64, "temperature": 0}).json()
    boxes = [b for b in reply["choices"][0]["message"]["boxes"] if "box" in b]
    assert boxes and [[d["x1"], d["y1"], d["x2"], d["y2"]] for d in drawn] == [b["box"] for b in boxes]
    # Each box is really on the canvas: the pixel in the middle of its left edge has the stroke colour.
    for d in drawn:
      rgba = driver.execute_script(
          "const c = document.getElementById('figure-0').getContext('2d');"
          "return Array.from(c.getImageData(arguments[0], arguments[1], 1, 1).data);",
          int(d["x1"]), int((d["y1"] + d["y2"]) / 2))
      assert "#%02x%02x%02x" % tuple(rgba[:3]) == d["colour"], (d, rgba)
  finally:
    driver.quit()
