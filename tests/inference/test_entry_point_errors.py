"""User mistakes at the inference entry points end as one `error:` line (+ hint) and exit status 2 through
`cli.run` (serve and `convert --mode=merge_lora/export_peft` used to print and exit themselves, convert with 1):
a tensor-parallel degree the model does not allow, slots that do not split over the replicas, a LoRA source that
is missing or not a LoRA run, an output that exists, a TPU kernel (--attention=splash) off a TPU."""
import json
import subprocess
import sys

import pytest

from qwenvl_jax.data.synthetic import synthetic_corpus
from qwenvl_jax.text import train_sentencepiece
from tests import background
from tests.training import helpers


def _run(module, args, tmp_path, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=helpers.subprocess_env(devices=8),
                        capture_output=True, text=True, timeout=timeout)


def _one_error(proc):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_generate_names_the_valid_tensor_parallel_degrees(tmp_path, sp_model_file):
  proc = _run("qwenvl_jax.generate", ["--model=tiny", f"--tokenizer={sp_model_file}", "--prompt=Hi",
                                      "--tensor_parallel=4"], tmp_path)
  (line,) = _one_error(proc)
  assert "--tensor_parallel=4 does not divide the model's" in line and "vit_heads 2" in line
  assert "hint: valid tensor-parallel degrees for this model: 1, 2" in proc.stderr


_GENERATE_MISTAKES = [  # (generate's flags, what the error line says; {folder}: the job's folder)
    (["--image={folder}/notimage.png"], "cannot"),
    (["--tokenizer={folder}/tok.model"], "corrupt SentencePiece model"),
    (["--max_new_tokens=0"], "max_new_tokens must be >= 1"),
    (["--do_sample", "--top_p=-1"], "top_p must be in (0, 1]"),
    (["--chat_format=raw", "--system=Answer in French."], "--history and --system need a chat model"),
    (["--save_history={folder}/no/dir/h.json"], "its folder does not exist"),
    (["--checkpoint={folder}/notimage.png"], "is a file, not a checkpoint folder"),
    # These were taken for "not given" or ignored without a word:
    (["--tokenizer={folder}/bad.tiktoken"], "is not a qwen vocabulary: corrupt vocabulary"),
    (["--image_size=0"], "--image_size=0 must be a positive multiple of the patch size"),
    (["--quantize=int4", "--group_size=0"], "--group_size=0 must be >= 1"),
    (["--quantize=int8", "--group_size=64"], "--quantize=int8 ignores it"),
    (["--temperature=0.7"], "--temperature sets sampling, and without --do_sample the answer is greedy"),
    (["--attention=splash"], "--attention=splash is a TPU kernel, but JAX runs on 'cpu' here")]


def _generate_mistakes(folder):
  """One `python -m qwenvl_jax.generate` per case of `_GENERATE_MISTAKES` (a process start each), with a tiny
  SentencePiece vocabulary of its own (the session's is a fixture): commands of a job registered in
  tests/background.py, run from the session's start on the core the other tests leave idle."""
  (folder / "notimage.png").write_text("hello")
  (folder / "tok.model").write_text("not a model")
  (folder / "bad.tiktoken").write_text("abc\n")
  vocabulary = train_sentencepiece(synthetic_corpus(300), folder / "sp", vocab_size=400)
  base = ["--model=tiny", f"--tokenizer={vocabulary}", "--prompt=Hi", "--dtype=float32"]
  return [background.Command([sys.executable, "-m", "qwenvl_jax.generate", *base,
                              *(flag.format(folder=folder) for flag in extra)],
                             helpers.subprocess_env(devices=8), folder, check=False)
          for extra, _ in _GENERATE_MISTAKES]


generate_mistakes = background.finished_work(__name__, "generate_mistakes", _generate_mistakes)


def test_generate_reports_bad_inputs_and_settings_in_one_line(generate_mistakes):
  """Each used to end in a traceback (a ValueError of the tokenizer, image decoder or generation settings) or to
  be ignored (history and system under the raw format, whose prompt has neither)."""
  _, procs = generate_mistakes
  assert len(procs) == len(_GENERATE_MISTAKES)
  for (extra, expected), proc in zip(_GENERATE_MISTAKES, procs):
    (line,) = _one_error(proc)
    assert expected in line, (extra, line)
  # The image, the generation settings and the chat format are checked before the weights load (minutes at full
  # size; they were checked after): the "random weights" note comes as they start loading.
  for i in (0, 2, 3, 4, len(_GENERATE_MISTAKES) - 1):
    assert "random weights" not in procs[i].stderr, (_GENERATE_MISTAKES[i], procs[i].stderr[-2000:])


@pytest.mark.slow
def test_serve_refuses_slots_that_do_not_split_over_the_replicas(tmp_path, sp_model_file):
  # 8 devices, tiny: tensor 2 (its 2-head ViT) x 4 replicas, so 6 slots do not split.
  proc = _run("qwenvl_jax.serve", ["--model=tiny", f"--tokenizer={sp_model_file}", "--num_slots=6",
                                   "--dtype=float32"], tmp_path)
  (line,) = _one_error(proc)
  assert "--num_slots=6 does not split over the 4 model replicas" in line and "data 4 x tensor 2" in line


def test_serve_names_a_missing_checkpoint(tmp_path):
  (line,) = _one_error(_run("qwenvl_jax.serve", [f"--checkpoint={tmp_path / 'nope'}"], tmp_path))
  assert "nope" in line and "does not exist" in line


def test_serve_refuses_a_cors_origin_a_browser_never_sends(tmp_path):
  proc = _run("qwenvl_jax.serve", [f"--checkpoint={tmp_path / 'nope'}", "--cors_origins=localhost:3000"], tmp_path)
  (line,) = _one_error(proc)
  assert "'localhost:3000' is not an origin" in line and "hint: give scheme://host[:port]" in proc.stderr


_BUSY: list = []  # the listening socket that holds the busy port of `_serve_mistakes`, open until the session ends


def _serve_mistakes(folder):
  """One `python -m qwenvl_jax.serve` per mistake found before the model loads and compiles (minutes at full size):
  commands of a job registered in tests/background.py, run from the session's start on the idle core. The busy port
  is held by a socket of this (pytest's) process, listening until the session ends."""
  import atexit, socket  # pylint: disable=import-outside-toplevel,multiple-imports
  busy = socket.socket()
  atexit.register(busy.close)
  busy.bind(("127.0.0.1", 0))
  busy.listen()
  _BUSY.append(busy)
  (folder / "afile").write_text("x")
  missing = [f"--checkpoint={folder / 'nope'}"]  # would fail later: these errors must come first
  cases = [[f"--port={busy.getsockname()[1]}"], ["--host=192.0.2.1", "--port=0"],  # TEST-NET: not ours
           ["--max_tokens_limit=0"], ["--port=99999"], [f"--image_root={folder / 'afile'}"], ["--attention=splash"],
           ["--compile_threads=-1"]]
  return [background.Command([sys.executable, "-m", "qwenvl_jax.serve", *missing, *extra],
                             helpers.subprocess_env(devices=8), folder, check=False) for extra in cases]


serve_mistakes = background.finished_work(__name__, "serve_mistakes", _serve_mistakes)


def test_serve_refuses_a_busy_port_a_bad_port_and_a_missing_image_root_before_loading(serve_mistakes):
  """Found before the model loads and compiles, not after: a busy port, a port out of range (uvicorn alone would
  hang on it), an --image_root that is not a folder (every request would fail), a TPU kernel off a TPU."""
  _, (busy_port, not_ours, no_tokens, bad_port, not_a_folder, splash, threads) = serve_mistakes
  port = _BUSY[0].getsockname()[1]
  (line,) = _one_error(busy_port)
  assert f"cannot listen on 127.0.0.1:{port}" in line and "another server holds the port" in busy_port.stderr
  (line,) = _one_error(not_ours)
  assert "cannot listen on 192.0.2.1:0" in line and "--host must be an address of this machine" in not_ours.stderr
  (line,) = _one_error(no_tokens)
  assert "--max_tokens_limit=0 must be >= 1" in line  # it started, then refused every request
  (line,) = _one_error(bad_port)
  assert "--port=99999 must be in 0..65535" in line
  (line,) = _one_error(not_a_folder)
  assert "is not a folder" in line
  (line,) = _one_error(splash)  # before the (missing) checkpoint is looked for
  assert "--attention=splash is a TPU kernel, but JAX runs on 'cpu' here" in line
  (line,) = _one_error(threads)
  assert "--compile_threads=-1 must be >= 0" in line


def _lora_mode_mistakes(folder):
  """One `python -m qwenvl_jax.convert` per mistake of the LoRA modes (and two of the others), each with its own
  output (none may be written): commands of a job registered in tests/background.py, run from the session's start
  on the core the other tests leave idle."""
  full = folder / "full_run"
  full.mkdir()
  (full / "config.json").write_text(json.dumps({"lora": {"rank": 0}}))
  # Into a run's checkpoints/ folder: the trainer took such a folder for one of its steps.
  run = folder / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({"lora": {"rank": 0}}))
  (folder / "out5.partial").mkdir()  # what a killed export leaves
  cases = [["--mode=merge_lora", f"--src={folder / 'no_run'}", f"--dst={folder / 'out1'}"],
           ["--mode=export_peft", f"--src={full}", f"--dst={folder / 'out2'}"],
           ["--mode=merge_lora", f"--src={full}", f"--dst={full}"],
           ["--mode=quantize", f"--src={folder / 'x'}", f"--dst={run / 'checkpoints' / '20'}"],
           ["--mode=orbax_to_torch", f"--src={folder / 'x'}", f"--dst={folder / 'out3'}", "--max_shard_gb=0"],
           ["--mode=export_peft", f"--src={full}", f"--dst={folder / 'out5'}"],
           # pathlib read these as the local folder gs:/bucket/...: the export went to this machine without a word.
           ["--mode=export_peft", f"--src={full}", "--dst=gs://bucket/adapter"],
           ["--mode=orbax_to_torch", f"--src={folder / 'x'}", "--dst=gs://bucket/hf"]]
  return [background.Command([sys.executable, "-m", "qwenvl_jax.convert", *args], helpers.subprocess_env(devices=8),
                             folder, check=False) for args in cases]


lora_mode_mistakes = background.finished_work(__name__, "lora_mode_mistakes", _lora_mode_mistakes)


def test_convert_lora_modes_report_user_mistakes_with_status_2(lora_mode_mistakes):
  folder, (no_run, not_lora, exists, in_checkpoints, shard_gb, killed_before, *urls) = lora_mode_mistakes
  (line,) = _one_error(no_run)
  assert "no_run" in line and "LoRA run" in line
  (line,) = _one_error(not_lora)
  assert "is not a LoRA run" in line
  (line,) = _one_error(exists)
  assert "already exists" in line and "hint: choose a new output directory" in exists.stderr
  (line,) = _one_error(in_checkpoints)
  assert "is inside the checkpoints folder of the training run" in line
  (line,) = _one_error(shard_gb)
  assert "--max_shard_gb=0 must be > 0" in line
  # Named before the run is read (this one is no LoRA run: that error would come next).
  (line,) = _one_error(killed_before)
  assert "out5.partial exists: the half-written output of an export that was killed" in line
  for proc, url in zip(urls, ("gs://bucket/adapter", "gs://bucket/hf")):
    (line,) = _one_error(proc)
    assert f"output {url} is a URL; this output is written as a local folder" in line
  assert not (folder / "gs:").exists()
