"""User mistakes at the inference entry points end as one `error:` line (+ hint) and exit status 2 through
`cli.run` (serve and `convert --mode=merge_lora/export_peft` used to print and exit themselves, convert with 1):
a tensor-parallel degree the model does not allow, slots that do not split over the replicas, a LoRA source that
is missing or not a LoRA run, an output that exists."""
import concurrent.futures
import json
import subprocess
import sys

import pytest

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


def test_generate_reports_bad_inputs_and_settings_in_one_line(tmp_path, sp_model_file):
  """Each used to end in a traceback (a ValueError of the tokenizer, image decoder or generation settings) or to
  be ignored (history and system under the raw format, whose prompt has neither)."""
  (tmp_path / "notimage.png").write_text("hello")
  (tmp_path / "tok.model").write_text("not a model")
  base = ["--model=tiny", f"--tokenizer={sp_model_file}", "--prompt=Hi", "--dtype=float32"]
  cases = [([f"--image={tmp_path / 'notimage.png'}"], "cannot"),
           ([f"--tokenizer={tmp_path / 'tok.model'}"], "corrupt SentencePiece model"),
           (["--max_new_tokens=0"], "max_new_tokens must be >= 1"),
           (["--do_sample", "--top_p=-1"], "top_p must be in (0, 1]"),
           (["--chat_format=raw", "--system=Answer in French."], "--history and --system need a chat model"),
           ([f"--save_history={tmp_path / 'no' / 'dir' / 'h.json'}"], "its folder does not exist"),
           ([f"--checkpoint={tmp_path / 'notimage.png'}"], "is a file, not a checkpoint folder"),
           # These were taken for "not given" or ignored without a word:
           ([f"--tokenizer={tmp_path / 'bad.tiktoken'}"], "is not a qwen vocabulary: corrupt vocabulary"),
           (["--image_size=0"], "--image_size=0 must be a positive multiple of the patch size"),
           (["--quantize=int4", "--group_size=0"], "--group_size=0 must be >= 1"),
           (["--quantize=int8", "--group_size=64"], "--quantize=int8 ignores it"),
           (["--temperature=0.7"], "--temperature sets sampling, and without --do_sample the answer is greedy")]
  (tmp_path / "bad.tiktoken").write_text("abc\n")
  with concurrent.futures.ThreadPoolExecutor(3) as pool:  # each is a process start: overlap them
    procs = list(pool.map(lambda extra: _run("qwenvl_jax.generate", base + extra, tmp_path), [e for e, _ in cases]))
  for (extra, expected), proc in zip(cases, procs):
    (line,) = _one_error(proc)
    assert expected in line, (extra, line)
  # The image, the generation settings and the chat format are checked before the weights load (minutes at full
  # size; they were checked after): the "random weights" note comes as they start loading.
  for i in (0, 2, 3, 4):
    assert "random weights" not in procs[i].stderr, (cases[i], procs[i].stderr[-2000:])


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


def test_serve_refuses_a_busy_port_a_bad_port_and_a_missing_image_root_before_loading(tmp_path):
  """Found before the model loads and compiles (minutes at full size), not after: a busy port, a port out of
  range (uvicorn alone would hang on it), an --image_root that is not a folder (every request would fail)."""
  import socket  # pylint: disable=import-outside-toplevel
  missing = [f"--checkpoint={tmp_path / 'nope'}"]  # would fail later: these errors must come first
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    proc = _run("qwenvl_jax.serve", missing + [f"--port={port}"], tmp_path)
    (line,) = _one_error(proc)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "another server holds the port" in proc.stderr
  proc = _run("qwenvl_jax.serve", missing + ["--host=192.0.2.1", "--port=0"], tmp_path)  # TEST-NET: not ours
  (line,) = _one_error(proc)
  assert "cannot listen on 192.0.2.1:0" in line and "--host must be an address of this machine" in proc.stderr
  (line,) = _one_error(_run("qwenvl_jax.serve", missing + ["--max_tokens_limit=0"], tmp_path))
  assert "--max_tokens_limit=0 must be >= 1" in line  # it started, then refused every request
  (line,) = _one_error(_run("qwenvl_jax.serve", missing + ["--port=99999"], tmp_path))
  assert "--port=99999 must be in 0..65535" in line
  (tmp_path / "afile").write_text("x")
  (line,) = _one_error(_run("qwenvl_jax.serve", missing + [f"--image_root={tmp_path / 'afile'}"], tmp_path))
  assert "is not a folder" in line


def test_convert_lora_modes_report_user_mistakes_with_status_2(tmp_path):
  (line,) = _one_error(_run("qwenvl_jax.convert", ["--mode=merge_lora", f"--src={tmp_path / 'no_run'}",
                                                   f"--dst={tmp_path / 'out'}"], tmp_path))
  assert "no_run" in line and "LoRA run" in line
  full = tmp_path / "full_run"
  full.mkdir()
  (full / "config.json").write_text(json.dumps({"lora": {"rank": 0}}))
  (line,) = _one_error(_run("qwenvl_jax.convert", ["--mode=export_peft", f"--src={full}",
                                                   f"--dst={tmp_path / 'out'}"], tmp_path))
  assert "is not a LoRA run" in line
  proc = _run("qwenvl_jax.convert", ["--mode=merge_lora", f"--src={full}", f"--dst={full}"], tmp_path)
  (line,) = _one_error(proc)
  assert "already exists" in line and "hint: choose a new output directory" in proc.stderr
  # Into a run's checkpoints/ folder: the trainer took such a folder for one of its steps.
  (full / "checkpoints").mkdir()
  (line,) = _one_error(_run("qwenvl_jax.convert", ["--mode=quantize", f"--src={tmp_path / 'x'}",
                                                   f"--dst={full / 'checkpoints' / '20'}"], tmp_path))
  assert "is inside the checkpoints folder of the training run" in line
  (line,) = _one_error(_run("qwenvl_jax.convert", ["--mode=orbax_to_torch", f"--src={tmp_path / 'x'}",
                                                   f"--dst={tmp_path / 'out'}", "--max_shard_gb=0"], tmp_path))
  assert "--max_shard_gb=0 must be > 0" in line
