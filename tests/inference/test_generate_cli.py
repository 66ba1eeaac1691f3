"""`python -m qwenvl_jax.generate` end to end on a tiny random model (subprocess, temporary paths).

The command lines run as a background job from the session's start (tests/background.py), on the core the other
tests leave idle; the tests read their exit codes, output and files.
"""
import json
import sys
import unicodedata

import pytest
from PIL import Image

from qwenvl_jax import errors
from qwenvl_jax.data.synthetic import synthetic_corpus
from qwenvl_jax.text import train_sentencepiece
from tests import background
from tests.training import helpers

# A long chat whose oldest turn names a picture since moved: that turn no longer fits the 6144-token window.
_LONG_TURN = ["Picture 1:<img>moved.png</img>\n" + "the red circle is next to the blue square. " * 900, "Yes."]


def _cli_runs(folder):
  """The command lines the tests below check, with a tiny SentencePiece vocabulary of their own (the session's is a
  fixture), in `folder` (their working directory): commands of a job registered in tests/background.py."""
  vocabulary = train_sentencepiece(synthetic_corpus(300), folder / "sp", vocab_size=400)
  picture = folder / "cat.png"
  Image.new("RGB", (50, 40), (10, 120, 200)).save(picture)
  (folder / "history.json").write_text(json.dumps([["Hello", "Hi."]]))
  (folder / "long_history.json").write_text(json.dumps([_LONG_TURN, ["Hello", "Hi."]]))
  (folder / "kept_history.json").write_text(json.dumps(
      [["Hello", "Hi."], ["Picture 1:<img>moved.png</img>\nWhat is it?", "A cat."]]))
  (folder / "boxes.png").write_bytes(b"user data")
  tiny = ["--model=tiny", f"--tokenizer={vocabulary}"]
  moved = tiny + ["--prompt=What next?", "--max_new_tokens=2", "--dtype=float32"]
  runs = {
      "history": tiny + [f"--image={picture}", "--prompt=What is it?", f"--history={folder / 'history.json'}",
                         f"--save_history={folder / 'saved.json'}", "--max_new_tokens=4", "--dtype=float32"],
      "window_leaves_it_out": moved + [f"--history={folder / 'long_history.json'}"],
      "window_keeps_it": moved + [f"--history={folder / 'kept_history.json'}"],
      "cannot_encode": tiny + ["--prompt=look <img>x", "--dtype=float32", f"--history={folder / 'kept_history.json'}"],
      "overwrite": tiny + [f"--image={picture}", "--prompt=Box the cat.", f"--output_image={folder / 'boxes.png'}"],
      "missing_image": tiny + ["--image=missing.jpg", "--prompt=Hi"],
  }
  assert tuple(runs) == _RUNS, tuple(runs)
  return [background.Command([sys.executable, "-m", "qwenvl_jax.generate", *argv], helpers.subprocess_env(), folder,
                             check=False) for argv in runs.values()]


# The names of `_cli_runs`'s commands, in order.
_RUNS = ("history", "window_leaves_it_out", "window_keeps_it", "cannot_encode", "overwrite", "missing_image")
cli_runs = background.finished_work(__name__, "cli_runs", _cli_runs)


def _ran(cli_runs, name):
  """The finished command `name` of `_cli_runs`."""
  folder, procs = cli_runs
  assert len(procs) == len(_RUNS), procs
  return folder, procs[_RUNS.index(name)]


@pytest.mark.slow
def test_cli_answers_with_history_and_saves_the_new_history(cli_runs):
  folder, proc = _ran(cli_runs, "history")
  assert proc.returncode == 0, proc.stderr[-3000:]
  turns = json.loads((folder / "saved.json").read_text())
  assert turns[0] == ["Hello", "Hi."]
  assert turns[1][0] == f"Picture 1:<img>{folder / 'cat.png'}</img>\nWhat is it?"
  assert proc.stdout.strip() == turns[1][1]  # what streamed is the answer


def test_cli_refuses_to_overwrite_the_output_png_before_any_work(cli_runs):
  folder, proc = _ran(cli_runs, "overwrite")
  assert proc.returncode != 0
  assert "already exists" in proc.stderr
  assert (folder / "boxes.png").read_bytes() == b"user data"


def test_cli_names_a_missing_image(cli_runs):
  _, proc = _ran(cli_runs, "missing_image")
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
def test_a_moved_picture_in_a_turn_the_window_leaves_out_is_no_error(cli_runs):
  """A long chat whose oldest turn names a picture since moved was refused, though that turn no longer fits the
  6144-token window and its picture is never read; a moved picture in a turn the prompt keeps is still one line,
  before the weights load."""
  _, proc = _ran(cli_runs, "window_leaves_it_out")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "the 1 oldest of the history's 2 turns do not fit" in proc.stderr, proc.stderr[-3000:]
  _, proc = _ran(cli_runs, "window_keeps_it")
  assert proc.returncode == 2 and "turn 2: picture moved.png does not exist" in proc.stderr, proc.stderr[-3000:]
  assert "random weights" not in proc.stderr  # found before the weights load
  # A prompt that cannot be encoded is the usual one line on this early path too (it was a ValueError traceback).
  _, proc = _ran(cli_runs, "cannot_encode")
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
