"""Checkpoint faults (issue 17): a damaged latest checkpoint falls back to the newest intact one; a save that fails
(disk full) is reported once, as soon as it fails, and the earlier checkpoints stay intact.

A small TrainState of random arrays (random, so the array files are large and a cut really truncates data) stands
in for a model: the fault handling is the same whatever the tree."""
import errno
import logging
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.path import async_path

from qwenvl_jax import errors
from qwenvl_jax.training.checkpointing import Checkpointer, CheckpointSaveError
from qwenvl_jax.training.step import TrainState


def _state(step):
  return TrainState(jnp.int32(step), {"w": jax.random.normal(jax.random.key(step), (128, 128))},
                    {"mu": jax.random.normal(jax.random.key(step + 100), (128,))})


def _target():
  return TrainState(jax.ShapeDtypeStruct((), jnp.int32), {"w": jax.ShapeDtypeStruct((128, 128), jnp.float32)},
                    {"mu": jax.ShapeDtypeStruct((128,), jnp.float32)})


def _data(position=0):
  it = iter(grain.MapDataset.range(1000).to_iter_dataset())
  for _ in range(position):
    next(it)
  return it


def _save_steps(workdir, steps, **kwargs):
  ckpt = Checkpointer(str(workdir), keep=5, async_save=False, **kwargs)
  for s in steps:
    ckpt.save(s, _state(s), _data(s), {"stage": 2})
  ckpt.wait()
  return ckpt


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def test_a_damaged_latest_checkpoint_falls_back_and_is_kept(tmp_path):
  _save_steps(tmp_path, (4, 8, 12)).close()
  victim = _largest_file(tmp_path / "checkpoints" / "12" / "params")
  size = os.path.getsize(victim)
  assert size > 10_000
  os.truncate(victim, size // 3)
  ckpt = Checkpointer(str(tmp_path), keep=5, async_save=False)
  warnings = []
  data = _data()
  step, state = ckpt.restore_latest_intact(_target(), data, warn=warnings.append)
  assert step == 8
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(_state(8).params["w"]))
  assert next(data) == 8  # the data iterator resumes with the checkpoint it came from
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert f"{ckpt.directory}/12 is damaged" in warnings[0] and "resuming from step 8" in warnings[0]
  # Kept, byte for byte, under another name; the step itself is free for the resumed run's own save.
  kept = tmp_path / "checkpoints" / "12.damaged"
  assert warnings[0].endswith(str(kept))
  assert os.path.getsize(str(victim).replace(os.sep + "12" + os.sep, os.sep + "12.damaged" + os.sep)) == size // 3
  assert ckpt.all_steps() == [4, 8]
  ckpt.save(12, _state(12), _data(12), {"stage": 2})
  ckpt.wait()
  assert ckpt.all_steps() == [4, 8, 12] and kept.is_dir()
  step, _ = ckpt.restore_latest_intact(_target(), _data(), warn=warnings.append)
  assert step == 12 and len(warnings) == 1
  ckpt.close()


def test_no_intact_checkpoint_is_a_clear_error_that_moves_nothing(tmp_path):
  _save_steps(tmp_path, (4,)).close()
  os.truncate(_largest_file(tmp_path / "checkpoints" / "4" / "params"), 100)
  ckpt = Checkpointer(str(tmp_path), keep=5, async_save=False)
  with pytest.raises(errors.UserError, match=r"no checkpoint in .* restores; the latest, step 4"):
    ckpt.restore_latest_intact(_target(), _data(), warn=lambda m: None)
  assert ckpt.all_steps() == [4]
  ckpt.close()


@pytest.fixture
def disk_full(monkeypatch):
  """Makes every later metadata write of orbax fail with ENOSPC, as a full disk does (no root needed)."""
  state = {"full": False}
  original = async_path.write_text

  async def write_text(path, text):
    if state["full"]:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await original(path, text)

  monkeypatch.setattr(async_path, "write_text", write_text)
  return state


def test_a_failed_background_save_is_reported_once_and_at_once(tmp_path, disk_full, caplog):
  ckpt = Checkpointer(str(tmp_path), keep=5, async_save=True)
  ckpt.save(4, _state(4), _data(4), {"stage": 2})
  ckpt.wait()
  disk_full["full"] = True
  with caplog.at_level(logging.INFO):
    ckpt.save(8, _state(8), _data(8), {"stage": 2})
    deadline = time.time() + 60
    with pytest.raises(CheckpointSaveError) as info:
      while time.time() < deadline:  # the trainer calls this after every step
        ckpt.check_for_errors()
        time.sleep(0.05)
    message = str(info.value)
    assert "saving checkpoint step 8" in message and "No space left on device" in message
    assert "the earlier checkpoints (steps 4) are intact" in message and "free space" in info.value.hint
    ckpt.check_for_errors()  # reported once: nothing is raised again
    ckpt.close()
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "orbax's own tracebacks leaked"
  disk_full["full"] = False
  fresh = Checkpointer(str(tmp_path), keep=5, async_save=False)
  assert fresh.all_steps() == [4]
  step, state = fresh.restore_latest_intact(_target(), _data(), warn=lambda m: None)
  assert step == 4
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.asarray(_state(4).params["w"]))
  fresh.close()
