"""`python -m qwenvl_jax.generate` end to end on a tiny random model (subprocess, temporary paths)."""
import json
import subprocess
import sys
import unicodedata

import pytest
from PIL import Image

from qwenvl_jax import errors
from tests.training import helpers


def _run(args, tmp_path, timeout=600):
  env = helpers.subprocess_env()
  return subprocess.run([sys.executable, "-m", "qwenvl_jax.generate", *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def picture(tmp_path):
  path = tmp_path / "cat.png"
  Image.new("RGB", (50, 40), (10, 120, 200)).save(path)
  return str(path)


@pytest.mark.slow
def test_cli_answers_with_history_and_saves_the_new_history(tmp_path, sp_model_file, picture):
  history = tmp_path / "history.json"
  history.write_text(json.dumps([["Hello", "Hi."]]))
  saved = tmp_path / "saved.json"
  proc = _run(["--model=tiny", f"--tokenizer={sp_model_file}", f"--image={picture}", "--prompt=What is it?",
               f"--history={history}", f"--save_history={saved}", "--max_new_tokens=4", "--dtype=float32"],
              tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  turns = json.loads(saved.read_text())
  assert turns[0] == ["Hello", "Hi."]
  assert turns[1][0] == f"Picture 1:<img>{picture}</img>\nWhat is it?"
  assert proc.stdout.strip() == turns[1][1]  # what streamed is the answer


def test_cli_refuses_to_overwrite_the_output_png_before_any_work(tmp_path, sp_model_file, picture):
  out = tmp_path / "boxes.png"
  out.write_bytes(b"user data")
  proc = _run(["--model=tiny", f"--tokenizer={sp_model_file}", f"--image={picture}", "--prompt=Box the cat.",
               f"--output_image={out}"], tmp_path, timeout=120)
  assert proc.returncode != 0
  assert "already exists" in proc.stderr
  assert out.read_bytes() == b"user data"


def test_cli_names_a_missing_image(tmp_path, sp_model_file):
  proc = _run(["--model=tiny", f"--tokenizer={sp_model_file}", "--image=missing.jpg", "--prompt=Hi"], tmp_path,
              timeout=120)
  assert proc.returncode != 0 and "missing.jpg" in proc.stderr


def test_default_png_name_sits_next_to_the_picture_and_never_replaces_one(tmp_path):
  from qwenvl_jax import generate  # pylint: disable=import-outside-toplevel
  picture = str(tmp_path / "street.jpg")
  assert generate._free_png_path(picture) == str(tmp_path / "street_boxes.png")
  (tmp_path / "street_boxes.png").write_bytes(b"x")
  (tmp_path / "street_boxes_1.png").write_bytes(b"x")
  assert generate._free_png_path(picture) == str(tmp_path / "street_boxes_2.png")


def test_images_are_named_by_absolute_path_so_a_saved_history_works_from_any_folder(tmp_path, monkeypatch):
  from qwenvl_jax import generate  # pylint: disable=import-outside-toplevel
  Image.new("RGB", (8, 8)).save(tmp_path / "my cat é.png")
  monkeypatch.chdir(tmp_path)
  assert generate._image_path("my cat é.png") == str(tmp_path / "my cat é.png")
  nfd = unicodedata.normalize("NFD", "café.png")  # a macOS file name: the tokenizer would read back "café.png"
  Image.new("RGB", (8, 8)).save(tmp_path / nfd)
  with pytest.raises(errors.ConfigError, match="NFC"):
    generate._image_path(nfd)
  # A folder with an NFD name (copied from a Mac): the relative name is NFC, the absolute path the prompt carries
  # is not, so the file read back would be missing; refused before the model loads.
  folder = tmp_path / unicodedata.normalize("NFD", "été")
  folder.mkdir()
  Image.new("RGB", (8, 8)).save(folder / "cat.png")
  monkeypatch.chdir(folder)
  with pytest.raises(errors.ConfigError, match="its absolute path .* is not NFC-normalized"):
    generate._image_path("cat.png")


def test_a_history_picture_that_is_missing_here_is_one_line_before_the_model_loads(tmp_path):
  from qwenvl_jax import generate  # pylint: disable=import-outside-toplevel
  history = tmp_path / "history.json"
  history.write_text(json.dumps([["Picture 1:<img>cat.png</img>\nWhat is it?", "A cat."]]))
  history_turns = generate._read_history(str(history))
  with pytest.raises(errors.UserFileNotFoundError, match="turn 1: picture cat.png does not exist"):
    generate._refuse_missing_pictures(generate._missing_pictures(history_turns), str(history))


@pytest.mark.slow
def test_a_moved_picture_in_a_turn_the_window_leaves_out_is_no_error(tmp_path, sp_model_file):
  """A long chat whose oldest turn names a picture since moved was refused, though that turn no longer fits the
  6144-token window and its picture is never read; a moved picture in a turn the prompt keeps is still one line,
  before the weights load."""
  long_turn = ["Picture 1:<img>moved.png</img>\n" + "the red circle is next to the blue square. " * 900, "Yes."]
  history = tmp_path / "history.json"
  history.write_text(json.dumps([long_turn, ["Hello", "Hi."]]))
  base = ["--model=tiny", f"--tokenizer={sp_model_file}", "--prompt=What next?", "--max_new_tokens=2",
          "--dtype=float32"]
  proc = _run(base + [f"--history={history}"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "the 1 oldest of the history's 2 turns do not fit" in proc.stderr, proc.stderr[-3000:]
  history.write_text(json.dumps([["Hello", "Hi."], ["Picture 1:<img>moved.png</img>\nWhat is it?", "A cat."]]))
  proc = _run(base + [f"--history={history}"], tmp_path)
  assert proc.returncode == 2 and "turn 2: picture moved.png does not exist" in proc.stderr, proc.stderr[-3000:]
  assert "random weights" not in proc.stderr  # found before the weights load
  # A prompt that cannot be encoded is the usual one line on this early path too (it was a ValueError traceback).
  proc = _run(base[:2] + ["--prompt=look <img>x", "--dtype=float32", f"--history={history}"], tmp_path)
  assert proc.returncode == 2 and "error: the conversation cannot be encoded" in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr


def test_boxes_go_on_the_latest_picture_of_the_turns_the_prompt_kept(tmp_path):
  """A turn the window left out named the only picture: the answer's boxes were drawn on it (the model never saw
  it), or failed after the answer when it had moved."""
  from qwenvl_jax import generate  # pylint: disable=import-outside-toplevel
  answer = "<ref>cat</ref><box>(10,20),(300,400)</box>"
  history = [("Picture 1:<img>gone.png</img>\nWhat is it?", "A cat."), ("Where is it?", answer)]
  generate._write_outputs(answer, history, None, str(tmp_path / "saved.json"), first_kept=1)  # nothing to draw
  assert json.loads((tmp_path / "saved.json").read_text()) == [list(t) for t in history]
  with pytest.raises(errors.UserError, match="gone.png"):  # kept: it is the picture, and it is not here
    generate._write_outputs(answer, history, None, None, first_kept=0)


def test_the_history_is_saved_before_a_picture_that_cannot_be_drawn_fails(tmp_path):
  from qwenvl_jax import generate  # pylint: disable=import-outside-toplevel
  answer = "<img>gone.png</img><ref>cat</ref><box>(10,20),(300,400)</box>"  # the answer names a missing picture
  history = [("Where is the cat?", answer)]
  with pytest.raises(errors.UserError, match="gone.png"):  # one line, after the history is written
    generate._write_outputs(answer, history, None, str(tmp_path / "saved.json"))
  assert json.loads((tmp_path / "saved.json").read_text()) == [list(t) for t in history]
