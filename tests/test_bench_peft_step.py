"""bench/bench_peft_step.py builds each mode from the trainer's own stage-3 config (no step is run here)."""
import argparse
import importlib.util
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
  spec = importlib.util.spec_from_file_location("bench_peft_step", os.path.join(REPO_ROOT, "bench",
                                                                                "bench_peft_step.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_modes_are_the_trainers_full_lora_and_qlora_configs():
  bench = _bench()
  args = argparse.Namespace(rank=8, qlora_quantize="nf4", batch=2, seq_len=64, images=1, res=56)
  full, lora, qlora = (bench.mode_config("tiny", m, args) for m in ("full", "lora", "qlora"))
  assert full.lora.rank == 0 and lora.lora.rank == 8 and qlora.lora.rank == 8
  assert lora.lora.base_quantize == "" and qlora.lora.base_quantize == "nf4"
  for c in (full, lora, qlora):
    assert c.stage == 3 and (c.batch_size, c.accum_steps, c.seq_len, c.max_images, c.res) == (2, 1, 64, 1, 56)
    assert c.remat == "none"
