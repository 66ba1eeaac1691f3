"""The public API of `qwenvl_jax`: a cheap import, every exported name resolves, and `load` restores a training
run's model and tokenizer (a run laid out by hand: config.json, checkpoints/<step>/params, tokenizer.model)."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwenvl_jax
from qwenvl_jax import checkpoint, errors
from qwenvl_jax.data.synthetic import synthetic_corpus
from qwenvl_jax.model import QwenVL, tiny
from qwenvl_jax.text import SentencePieceTokenizer, train_sentencepiece


def test_import_is_cheap_and_every_export_resolves():
  code = ("import sys, qwenvl_jax; heavy = [m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules]; "
          "assert not heavy, heavy")
  subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
  for name in qwenvl_jax.__all__:
    assert getattr(qwenvl_jax, name) is not None, name
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    getattr(qwenvl_jax, "nope")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A stage run's workdir with one checkpoint of a tiny float32 model and its SentencePiece tokenizer."""
  root = tmp_path_factory.mktemp("api")
  sp = train_sentencepiece(synthetic_corpus(300), root / "sp", vocab_size=400)
  workdir = root / "run"
  workdir.mkdir()
  shutil.copy(sp, workdir / "tokenizer.model")
  tok = SentencePieceTokenizer(sp)
  model = QwenVL(tiny(dtype="float32", param_dtype="float32", remat_policy="none", image_pad_id=tok.img_pad_id)
                 .with_image_size(56), rngs=nnx.Rngs(3))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  checkpoint.save_params(workdir / "checkpoints" / "7" / "params", params)
  (workdir / "config.json").write_text(json.dumps({"model": "tiny", "res": 56, "tokenizer": "", "stage": 2}))
  return workdir, model, tok


@pytest.mark.slow
def test_load_a_training_run(run):
  workdir, model, tok = run
  loaded = qwenvl_jax.load(str(workdir), dtype="float32")
  assert loaded.chat_format == "raw"  # a stage-2 run
  assert isinstance(loaded.tokenizer, SentencePieceTokenizer) and loaded.tokenizer.encode("red") == tok.encode("red")
  assert loaded.model.cfg.vision.image_size == 56 and loaded.model.cfg.image_pad_id == tok.img_pad_id
  want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  got = nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
  ids = jnp.asarray([tok.encode("a red circle")], jnp.int32)
  np.testing.assert_allclose(np.asarray(loaded.model(ids).logits), np.asarray(model(ids).logits), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_load_quantizes_on_request_as_the_cli_does(run):
  """`load(..., quantize=)` was a TypeError: the CLI's --quantize had no library spelling."""
  workdir, _, tok = run
  loaded = qwenvl_jax.load(str(workdir), dtype="float32", quantize="int8")
  w1 = loaded.model.llm.blocks.mlp.w1.qvalue[...]
  assert w1.dtype == jnp.int8
  ids = jnp.asarray([tok.encode("a red circle")], jnp.int32)
  assert np.isfinite(np.asarray(loaded.model(ids).logits)).all()
  with pytest.raises(ValueError, match="int3"):
    qwenvl_jax.load(str(workdir), quantize="int3")
  # As the CLI's --group_size: ignored (int8) or turned into the default (0), it was a silent no-op.
  with pytest.raises(errors.ConfigError, match=r"group_size=64: the group size of int4 weights.*'int8' has none"):
    qwenvl_jax.load(str(workdir), quantize="int8", group_size=64)
  with pytest.raises(errors.ConfigError, match="group_size=0 must be >= 1"):
    qwenvl_jax.load(str(workdir), quantize="int4", group_size=0)


def test_load_errors_name_what_is_missing(tmp_path):
  converted = tmp_path / "params"  # what model_source takes for a converted params checkpoint (no run config)
  converted.mkdir()
  (converted / "_METADATA").write_text("{}")
  # The package's user errors (the ConfigError a CLI prints as one line), not a bare ValueError.
  with pytest.raises(errors.ConfigError, match="needs tokenizer="):
    qwenvl_jax.load(str(converted))
  with pytest.raises(errors.ConfigError, match="load\\(\\) needs a checkpoint"):
    qwenvl_jax.load(None)
  with pytest.raises(FileNotFoundError, match="is neither a training run"):
    qwenvl_jax.load(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    qwenvl_jax.load(str(tmp_path / "runs" / "checkpoints" / "9"))
  # The TPU kernel off a TPU is named before the checkpoint is looked at (here it is one that does not exist).
  with pytest.raises(errors.ConfigError, match="attention=splash is a TPU kernel, but JAX runs on 'cpu'"):
    qwenvl_jax.load(str(tmp_path / "nope"), attention="splash")


def test_load_takes_a_pathlib_path_and_names_a_wrong_type(tmp_path):
  """A pathlib.Path is what most code holds for a folder: it resolves like its string (it was an AttributeError,
  'PosixPath' object has no attribute 'rpartition', from the RUN@STEP parsing); anything else is one line."""
  with pytest.raises(FileNotFoundError, match="does not exist"):
    qwenvl_jax.load(tmp_path / "runs" / "nope")
  with pytest.raises(FileNotFoundError, match="is neither a training run"):
    qwenvl_jax.load(tmp_path)
  with pytest.raises(ValueError, match=r"path \(str or pathlib.Path\), got int 5"):
    qwenvl_jax.load(5)


@pytest.mark.slow
def test_the_readme_library_snippet_runs_and_chats_in_the_runs_format(run, tmp_path, monkeypatch):
  """The README's Python block, run as written from another folder (only the run directory swapped in): it chatted
  in ChatML with every model, while a stage-1/2 run (`loaded.chat_format == 'raw'`) was trained on raw text, so its
  answers came from a prompt format it never saw."""
  workdir, _, _ = run
  readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
  section = re.search(r"^## Install as a library\b.*?(?=^## )", readme, flags=re.S | re.M).group(0)
  snippet = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
  assert '"runs/stage2"' in snippet and "a.png" in snippet
  shutil.copy(pathlib.Path(__file__).parent.parent / "docs" / "images" / "scene.png", tmp_path / "a.png")
  monkeypatch.chdir(tmp_path)
  calls = []
  real_chat = qwenvl_jax.chat

  def spy(*args, **kwargs):
    calls.append(kwargs.get("chat_format", "chatml"))
    kwargs["gen"] = qwenvl_jax.inference.chat_generation_config(args[1], calls[-1], max_new_tokens=3)
    return real_chat(*args, **kwargs)

  monkeypatch.setattr(qwenvl_jax, "chat", spy)
  scope = {}
  exec(snippet.replace('"runs/stage2"', repr(str(workdir))), scope)  # pylint: disable=exec-used
  assert calls == ["raw"] and scope["loaded"].chat_format == "raw"  # the fixture is a stage-2 run
  assert scope["history"] == [("Picture 1:<img>a.png</img>\nWhat is this?", scope["reply"])]


def test_dir_lists_the_exports_not_the_helpers():
  """`dir(qwenvl_jax)` (what tab completion shows) offered `importlib` and `_EXPORTS` next to the API."""
  assert [n for n in dir(qwenvl_jax) if not n.startswith("__")] == sorted(qwenvl_jax.__all__)
