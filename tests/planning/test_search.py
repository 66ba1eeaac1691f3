"""`plan --search`: the candidate space, pruning, the compile budget and cache, ranking, and the batch advice."""
import json
import os
import re
import subprocess
import sys

import pytest

from configs import stage1
from qwenvl_jax.hardware import chips
from qwenvl_jax.planning import aot, search
from tests.planning.conftest import REPO_ROOT, requires_libtpu, run_json
from tests.training import helpers


def test_candidates_split_the_micro_batch_over_data_x_fsdp():
  found = search.candidates(128, 64, 1, attentions=("xla",), remats=("full",))
  # tensor 1 -> fsdp 64: micro-batches of 64 or 128 rows (A = 2, 1); tensor 2 -> fsdp 32: A = 1, 2, 4; ...
  layouts = sorted({(c.fsdp, c.tensor, c.accum) for c in found})
  assert (64, 1, 1) in layouts and (64, 1, 2) in layouts and (64, 1, 8) not in layouts
  assert (16, 4, 8) in layouts and (8, 8, 16) in layouts
  assert all((128 // c.accum) % c.fsdp == 0 and c.fsdp * c.tensor == 64 for c in found)
  # Splash is a TPU kernel: not offered for GPUs.
  assert all(c.attention == "xla" for c in search.candidates(8, 4, 1, platform="gpu"))


def test_nearest_valid_plans_for_a_batch_that_does_not_split():
  # Stage 3's paper batch: 128 rows in 8 micro-batches = 16 rows, over 64 chips of v5p-128.
  plans = search.nearest_valid(128, 8, 64, 1)
  for batch, accum, fsdp, tensor in plans:
    assert fsdp * tensor == 64 and (batch // accum) % fsdp == 0
  assert (128, 8, 16, 4) in plans  # keeps batch and accumulation with tensor parallelism 4
  assert (128, 2, 64, 1) in plans  # or keeps the mesh with fewer micro-batches
  assert (512, 8, 64, 1) in plans  # or the nearest batch that splits as configured


def _fake_compile(config, topology):
  """A StepPlan whose figures follow the layout: remat none does not fit, fewer micro-batches are faster."""
  gib = chips.GIB
  temp = 20 * gib if config.remat == "none" else 4 * gib
  return aot.StepPlan(chip=topology.chip, num_chips=topology.num_chips, argument_bytes=gib, output_bytes=gib,
                      alias_bytes=gib, temp_bytes=temp, code_bytes=0, flops=1e12, bytes_accessed=None,
                      optimal_seconds=0.1 * config.accum_steps + (0.05 if config.remat == "full" else 0.0),
                      model_flops=1e14)


def test_search_prunes_bounds_compiles_caches_and_ranks(tmp_path):
  config = stage1.get_config("model=tiny")
  topo = chips.parse_topology("v5e:2x2")
  calls = []

  def compile_fn(c, t):
    calls.append((c.remat, c.accum_steps, c.mesh.ici.fsdp, c.mesh.ici.tensor, c.mesh.rules))
    return _fake_compile(c, t)

  kw = dict(cache_dir=str(tmp_path), attentions=("xla",), tensors=(1, 2), compile_fn=compile_fn, log=lambda _: 0)
  rows = search.search(config, topo, max_compiles=5, **kw)
  assert len(calls) == 5  # the budget
  assert all(rules == ("fsdp_tp" if tp > 1 else "fsdp") for _, _, _, tp, rules in calls)
  compiled = [r for r in rows if r.status == "compiled"]
  assert len(compiled) == 5 and len(rows) > 5
  top = search.best(rows)
  assert top is rows[0] and top.fits and top.candidate.remat != "none"
  assert top.step_seconds == min(r.step_seconds for r in compiled if r.fits)
  flags = top.candidate.flags(top.candidate.rules(config.mesh.rules))
  assert f"--config.accum_steps={top.candidate.accum}" in flags and "--config.mesh.ici.fsdp=" in flags
  table = search.format_table(rows, topo.chip.hbm_bytes)
  assert "not compiled" in table and "compiled" in table
  # A second run reads the five from the cache and spends its budget on the next ones.
  calls.clear()
  again = search.search(config, topo, max_compiles=2, **kw)
  assert len(calls) == 2
  assert sum("(cached)" in r.note for r in again) == 5


def test_the_best_plan_of_a_tiny_step_says_its_time_in_microseconds_with_tokens_per_second():
  """It said 'estimated 0.00 s/step' and showed the layout as a Python repr."""
  config = stage1.get_config("model=tiny")  # 8 rows x 128 tokens
  row = search.Row(search.Candidate("dots", 1, 4, 1, "xla"), 1.0, 1.0, status="compiled", fits=True,
                   step_seconds=4.5e-4, mfu_low=0.014, mfu_high=0.017)
  head, flags = search.format_best(row, config, 4).splitlines()
  assert head == ("best plan: remat dots, 1 micro-batch, fsdp 4 x tensor 1, xla attention, estimated 450 us/step, "
                  "2.28M tokens/s (569k per chip), MFU 1.4% .. 1.7%")
  assert flags.strip().startswith("--config.remat=dots --config.accum_steps=1")
  out = json.loads(json.dumps(search.best_to_dict(row, config, 4)))  # plan --search --json
  assert out["flags"] == flags.strip() and out["micro_batches"] == 1 and out["fsdp"] == 4
  assert out["step_seconds"] == 4.5e-4 and out["mfu"] == {"no_overlap": 0.014, "full_overlap": 0.017}
  assert out["tokens_per_second"] == pytest.approx(1024 / 4.5e-4)
  assert out["tokens_per_second_per_chip"] == pytest.approx(1024 / 4.5e-4 / 4)


def test_a_missing_libtpu_ends_the_search_instead_of_failing_every_layout():
  """Without libtpu every compile was a 'compile failed' row and the search ended on 'raise --max_compiles'."""
  from qwenvl_jax.planning import mesh  # pylint: disable=import-outside-toplevel
  calls = []

  def compile_fn(config, topology):
    calls.append(config)
    raise mesh.MissingLibtpuError("AOT compilation for TPU needs libtpu")

  with pytest.raises(mesh.MissingLibtpuError):
    search.search(stage1.get_config("model=tiny"), chips.parse_topology("v5e:2x2"), max_compiles=4,
                  attentions=("xla",), tensors=(1,), compile_fn=compile_fn, log=lambda _: 0)
  assert len(calls) == 1


def test_search_prunes_what_cannot_fit_before_compiling():
  config = stage1.get_config("model=tiny")
  with config.unlocked():
    config.seq_len = 65536  # float32 logits alone: 8 rows x 64k tokens x vocab x 10 B per chip >> 16 GiB
  rows = search.search(config, chips.parse_topology("v5e:2x2"), max_compiles=1, attentions=("xla",),
                       tensors=(1,), compile_fn=_fake_compile, log=lambda _: 0)
  assert rows and all(r.status == "pruned" for r in rows)
  assert search.best(rows) is None


def test_cli_suggests_plans_for_a_batch_that_does_not_split():
  env = helpers.subprocess_env()
  proc = subprocess.run([sys.executable, "-m", "qwenvl_jax.plan", "--config=configs/stage3.py:model=qwen_vl_7b",
                         "--topology=v5p-128"], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                        timeout=600, check=False)
  assert proc.returncode == 2
  assert "Traceback" not in proc.stderr
  assert "does not split over the 64 data x fsdp chips" in proc.stderr
  assert ("--config.accum_steps=8 --config.mesh.ici.data=1 --config.mesh.ici.fsdp=16 --config.mesh.ici.tensor=4"
          in proc.stderr)


@requires_libtpu
@pytest.mark.slow
def test_search_compiles_real_tiny_plans_for_a_tpu_slice():
  out = run_json("""
      import json
      from configs import stage1
      from qwenvl_jax.hardware import chips
      from qwenvl_jax.planning import search
      rows = search.search(stage1.get_config("model=tiny"), chips.parse_topology("v5e:2x2"), max_compiles=2,
                           remats=("full",), attentions=("xla",), tensors=(1, 2), log=lambda _: 0)
      print(json.dumps([dict(status=r.status, fits=r.fits, comm=r.comm_seconds, mfu=r.mfu_high, tp=r.candidate.tensor)
                        for r in rows]))
  """)
  compiled = [r for r in out if r["status"] == "compiled"]
  assert len(compiled) == 2 and all(r["fits"] and r["comm"] > 0 and 0 < r["mfu"] <= 1 for r in compiled)


@pytest.mark.parametrize("remats, attentions, tensors, message", [
    (["foo"], ["xla"], ["1"], "--search_remat=foo: 'foo' is not one of none, full, dots, dots_no_batch"),
    ([], ["xla"], ["1"], "--search_remat=: give one or more of none, full, dots, dots_no_batch"),
    (["full"], ["cudnn"], ["1"], "--search_attention=cudnn: 'cudnn' is not one of xla, splash"),
    (["full"], ["xla"], ["1", "x"], "--search_tensor=1,x: 'x' is not a positive integer"),
    (["full"], ["xla"], ["0"], "--search_tensor=0: '0' is not a positive integer"),
    (["full"], ["xla"], ["3", "5"], "--search_tensor=3,5: no degree divides the 4 chips of a slice"),
])
def test_search_values_no_layout_can_take_are_refused(remats, attentions, tensors, message):
  """A bad remat or kernel made every compile a 'compile failed' row and then said 'raise --max_compiles'; a
  tensor degree that is no integer was int()'s traceback, one that divides no chip count an empty search."""
  from qwenvl_jax import errors  # pylint: disable=import-outside-toplevel
  with pytest.raises(errors.ConfigError, match="^" + re.escape(message)):
    search.check_values(remats, attentions, tensors, 4)
  assert search.check_values(["full", "dots"], ["xla", "splash"], ["1", "2", "8"], 4) == [1, 2, 8]


def test_no_fit_says_raise_max_compiles_only_when_layouts_are_left():
  cand = search.Candidate("full", 1, 4, 1, "xla")
  left = [search.Row(cand, 1.0, 1.0, status="compiled", fits=False), search.Row(cand, 1.0, 1.0)]
  assert "1 layout(s) not compiled yet: raise --max_compiles" in search.no_fit_message(left)
  done = [search.Row(cand, 1.0, 1.0, status="compiled", fits=False), search.Row(cand, 1.0, 1.0, status="pruned")]
  message = search.no_fit_message(done)
  assert message.startswith("no layout fits (1 compiled over HBM, 0 failed to compile, 1 pruned by the memory "
                            "estimate): a larger topology") and "max_compiles" not in message


def test_cli_search_with_no_layout_is_one_line():
  env = helpers.subprocess_env()
  out = subprocess.run([sys.executable, "-m", "qwenvl_jax.plan", "--config=configs/stage1.py:model=tiny",
                        "--topology=v5e-16", "--search", "--search_tensor=1", "--search_cache="],
                       capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-2] == (
      "error: no layout to search: config.batch_size=8 in any number of micro-batches does not split over 16 data x "
      "fsdp chips (--search_tensor=1 on v5litepod-16)")
  assert "Traceback" not in out.stderr and "searching" not in out.stdout


def test_a_cached_row_cut_short_is_a_miss_and_rows_are_written_whole(tmp_path):
  """A search killed while it wrote a cached row left half a JSON file: every later search of that config ended in a
  JSONDecodeError traceback. Now that row is compiled again; rows are written to a temporary file and renamed."""
  path = str(tmp_path / "cache" / "row.json")
  assert search._read_cached(path) is None  # pylint: disable=protected-access
  search._write_cached(path, {"status": "compiled", "fits": True})  # pylint: disable=protected-access
  assert search._read_cached(path) == {"status": "compiled", "fits": True}  # pylint: disable=protected-access
  assert os.listdir(tmp_path / "cache") == ["row.json"]
  with open(path, "w", encoding="utf-8") as f:
    f.write('{"status": "comp')
  assert search._read_cached(path) is None  # pylint: disable=protected-access
