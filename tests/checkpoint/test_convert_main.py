"""`python -m qwenvl_jax.convert`: both directions from the command line, and flag errors."""
import json
import os
import pathlib
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests import background
from tests.training import helpers
from .conftest import qwen_llm_shapes, qwenvl_visual_shapes, random_state_dict, write_checkpoint

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[2]


def _tiny_state() -> dict:
  from qwenvl_jax.model import tiny  # pylint: disable=import-outside-toplevel
  return random_state_dict({**qwenvl_visual_shapes(tiny()), **qwen_llm_shapes(tiny())}, torch.bfloat16, 0)


def _convert(*flags, check=True) -> background.Command:
  """`python -m qwenvl_jax.convert FLAGS` as a job's command (`check`: a failure ends the job)."""
  env = helpers.subprocess_env()
  return background.Command([sys.executable, "-m", "qwenvl_jax.convert", *flags], env, REPO, check=check)


def _round_trip(folder):
  """The commands of `test_command_line_round_trip_and_quantize`, in its order, on a tiny random `.bin` checkpoint
  written here: a job registered in tests/background.py, run from the session's start on the core the other tests
  leave idle. A command that must succeed ends the job when it fails; the refused ones (exit 2) do not."""
  src = folder / "hf"
  write_checkpoint(src, _tiny_state(), fmt="bin")
  (src / "generation_config.json").write_text('{"chat_format": "raw"}')
  (src / "qwen.tiktoken").write_bytes(b"IQ== 0\n")
  (src / "modeling_qwen.py").write_text("# the reference's code")
  return [_convert("--mode=torch_to_orbax", "--preset=tiny", f"--src={src}", f"--dst={folder / 'orbax'}"),
          _convert("--mode=orbax_to_torch", "--preset=tiny", "--image_size=224", "--chat_format=chatml",
                   f"--src={folder / 'orbax'}", f"--dst={folder / 'export'}"),
          _convert("--mode=init_from_pretrained", "--preset=tiny", f"--openclip={src}", f"--dst={folder / 'i'}",
                   check=False),
          _convert("--mode=torch_to_orbax", "--preset=tiny", "--quantize=int4", f"--src={src}",
                   f"--dst={folder / 'q'}", check=False),
          _convert("--mode=export_peft", f"--src={src}", f"--dst={folder / 'p'}", "--tokenizer=qwen.tiktoken",
                   check=False),
          _convert("--mode=quantize", "--quantize=int8", "--chat_format=chatml", "--dtype=bfloat16",
                   f"--src={folder / 'orbax'}", f"--dst={folder / 'int8'}")]


round_trip = background.finished_work(__name__, "round_trip", _round_trip)


def test_command_line_round_trip_and_quantize(round_trip):
  """torch -> Orbax -> torch is bit-exact. `--mode=quantize` without --model / --image_size reads the preset and
  image size the source recorded (it used to take the qwen_vl_7b default and fail on the shapes) and records them,
  the chat format and its own copy of the tokenizer, so the quantized checkpoint loads without flags too."""
  from qwenvl_jax.checkpoint import orbax_store  # pylint: disable=import-outside-toplevel
  from qwenvl_jax.inference import model_source  # pylint: disable=import-outside-toplevel
  tmp_path, runs = round_trip
  src, state = tmp_path / "hf", _tiny_state()
  runs = iter(runs)
  run = next(runs)
  assert run.returncode == 0, run.stderr[-3000:]
  run = next(runs)
  assert run.returncode == 0, run.stderr[-3000:]
  out = {}
  for f in (tmp_path / "export").glob("*.safetensors"):
    out.update(load_file(str(f)))
  assert sorted(out) == sorted(state)
  assert all(torch.equal(out[k].view(torch.int16), state[k].view(torch.int16)) for k in state)
  # Without --reference_files the export keeps the checkpoint's own vocabulary (it had no tokenizer file) and says
  # in one line what transformers still needs, naming the folder it was converted from (which holds the code).
  assert (tmp_path / "export" / "qwen.tiktoken").read_bytes() == b"IQ== 0\n"
  # ... and a generation_config.json: of the chat format the checkpoint records (raw), or --chat_format's (it was
  # refused: 'recorded in params checkpoints').
  assert '"chat_format": "chatml"' in (tmp_path / "export" / "generation_config.json").read_text()
  note, = [x for x in run.stderr.splitlines() if x.startswith("note: ")]
  assert "lacks configuration_qwen.py, modeling_qwen.py" in note and "--reference_files=DIR" in note
  assert f"(e.g. the folder it was converted from, {src})" in note
  run = next(runs)
  assert run.returncode != 0 and "--qwen7b" in run.stderr
  # A flag the mode does not read was ignored without a word: this wrote a float checkpoint.
  run = next(runs)
  assert run.returncode == 2 and not (tmp_path / "q").exists(), run.stderr[-3000:]
  assert run.stderr.splitlines()[0] == "error: --quantize is not read by --mode=torch_to_orbax (only by quantize)"
  # ... one line and exit 2 like the others (it was absl's usage banner and exit 1).
  run = next(runs)
  assert run.returncode == 2 and run.stderr.splitlines()[0].startswith(
      "error: --tokenizer is not read by --mode=export_peft"), run.stderr[-3000:]

  assert orbax_store.ParamReader(tmp_path / "orbax").custom_metadata["model"]["chat_format"] == "raw"
  # --chat_format replaces what the source records (here: the base model's raw, now fine-tuned to chat).
  # --dtype is what the parts left unquantized are stored as (it was accepted and ignored: float32).
  run = next(runs)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "(tiny, 448 px)" in run.stdout
  reader = orbax_store.ParamReader(tmp_path / "int8")
  meta = reader.custom_metadata
  assert meta["quantization"]["mode"] == "int8"
  codes = {k.rpartition(".")[0] for k in reader.shapes if k.endswith(".qvalue")}
  stored = {k: str(d) for k, (_, d) in reader.shapes.items()}
  assert {d for k, d in stored.items() if k.rpartition(".")[0] not in codes} == {"bfloat16"}  # norms, biases, ...
  assert stored["llm.blocks.attn.qkv.bias"] == "bfloat16"  # a quantized projection's bias too
  assert {d for k, d in stored.items() if k.rpartition(".")[0] in codes and k.endswith(".scale")} == {"float32"}
  assert meta["model"] == {"image_size": 448, "preset": "tiny", "chat_format": "chatml",
                           "tokenizer": "qwen:qwen.tiktoken"}
  source = model_source.resolve(str(tmp_path / "int8"))
  assert (source.preset, source.image_size, source.chat_format) == ("tiny", 448, "chatml")
  assert source.tokenizer == f"qwen:{tmp_path / 'int8' / 'qwen.tiktoken'}"
  assert (tmp_path / "int8" / "qwen.tiktoken").read_bytes() == b"IQ== 0\n"


def _run_directory_export(folder):
  """The commands of `test_exports_take_a_run_directory_and_a_wrong_preset_is_one_line`, in its order, on a tiny
  random `.bin` checkpoint written here (the run directory's params are a copy of its conversion, made by the
  fourth): a job registered in tests/background.py, run from the session's start on the core the other tests
  leave idle."""
  src, orbax, run = folder / "hf", folder / "orbax", folder / "run"
  write_checkpoint(src, _tiny_state(), fmt="bin")
  run.mkdir()
  (run / "config.json").write_text(json.dumps({"model": "tiny", "res": 224, "stage": 2, "tokenizer": ""}))
  (folder / "chat").mkdir()
  (folder / "chat" / "generation_config.json").write_text(json.dumps({"chat_format": "chatml", "top_p": 0.5}))
  (folder / "chat" / "qwen.tiktoken").write_bytes(b"IQ== 0\n")
  (folder / "mine.tiktoken").write_bytes(b"Ig== 0\n")
  return [_convert("--mode=torch_to_orbax", "--model=tiny", "--image_size=224", f"--src={src}", f"--dst={orbax}"),
          _convert("--mode=orbax_to_torch", "--model=qwen_vl_7b", f"--src={orbax}", f"--dst={folder / 'x'}",
                   check=False),
          _convert("--mode=orbax_to_torch", f"--src={src}", f"--dst={folder / 'x'}", check=False),
          background.Command([sys.executable, "-c", "import shutil, sys; shutil.copytree(*sys.argv[1:])", str(orbax),
                              str(run / "checkpoints" / "7" / "params")], dict(os.environ), REPO),
          _convert("--mode=orbax_to_torch", f"--src={run}", f"--dst={folder / 'export'}",
                   f"--reference_files={folder / 'chat'}", f"--tokenizer={folder / 'mine.tiktoken'}")]


run_directory_export = background.finished_work(__name__, "run_directory_export", _run_directory_export)


def test_exports_take_a_run_directory_and_a_wrong_preset_is_one_line(run_directory_export):
  """A run directory supplies params, preset and resolution (as for generate); a params checkpoint of another
  model than --preset says so in one line with the fix, instead of a multi-kilobyte traceback."""
  tmp_path, runs = run_directory_export
  src, orbax = tmp_path / "hf", tmp_path / "orbax"
  converted, wrong, swapped, copied, done = runs + [None] * (5 - len(runs))
  assert converted.returncode == 0, converted.stderr[-3000:]
  # What it was converted for is recorded, so generate/serve/evaluate need not be told (a forgotten --image_size
  # ran the model at the preset's size without a word).
  from qwenvl_jax.inference import model_source  # pylint: disable=import-outside-toplevel
  recorded = model_source.resolve(str(orbax), tokenizer="t.model")
  assert (recorded.preset, recorded.image_size) == ("tiny", 224)
  assert model_source.resolve(str(orbax), model="tiny", image_size=448).image_size == 448  # flags win
  # Convert reads the record too (without --model it exports as tiny: the run-directory export below); a --model
  # that does not fit the stored weights is one line.
  assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, wrong.stderr[-3000:]
  line, = [x for x in wrong.stderr.splitlines() if x.startswith("error: ")]
  assert "does not match the model" in line and "more" in line and len(line) < 1500
  assert "hint: the weights are another model's: name its preset" in wrong.stderr
  assert not (tmp_path / "x").exists()
  # The PyTorch folder given to the export: 'not an Orbax PyTree checkpoint (no _METADATA)' named no fix.
  line, = [x for x in swapped.stderr.splitlines() if x.startswith("error: ")]
  assert swapped.returncode == 2 and f"it holds PyTorch weights: python -m qwenvl_jax.convert --mode=torch_to_orbax " \
      f"--src={src}" in line, swapped.stderr[-3000:]
  assert copied.returncode == 0, copied.stderr[-3000:]
  run = tmp_path / "run"
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"of {run / 'checkpoints' / '7' / 'params'} (tiny, 224 px) to" in done.stdout
  assert json.loads((tmp_path / "export" / "config.json").read_text())["visual"]["image_size"] == 224
  # A stage-2 run is a base model: a chat model's generation_config.json from --reference_files says so now.
  assert json.loads((tmp_path / "export" / "generation_config.json").read_text()) == {"chat_format": "raw",
                                                                                      "top_p": 0.5}
  assert f"chat_format 'chatml'; the export's copy says 'raw', as {run} records (the rest is theirs)" in done.stderr
  # --tokenizer was refused ('recorded in params checkpoints'); the export now carries it, over the reference's.
  assert (tmp_path / "export" / "qwen.tiktoken").read_bytes() == b"Ig== 0\n"
