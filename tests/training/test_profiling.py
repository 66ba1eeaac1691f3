"""`config.profile_steps`: a jax.profiler trace of the chosen steps in the workdir, and clear refusals."""
import gzip
import json

import pytest

from qwenvl_jax.training import profiling, train
from tests.training.helpers import small_config


@pytest.mark.slow
def test_trace_of_the_chosen_steps_is_written(uninterrupted, tmp_path):
  """The `uninterrupted` run's config (its step comes from the compilation cache), traced at steps 2..3."""
  result = train(small_config(2, tmp_path / "run", stop_at_step=4, profile_steps="2:4"))
  assert result.step == 4
  runs = list((tmp_path / "run" / "profile" / "plugins" / "profile").iterdir())
  assert len(runs) == 1
  assert list(runs[0].glob("*.xplane.pb"))  # TensorBoard's profile tab
  perfetto = list(runs[0].glob("perfetto_trace.json.gz"))
  assert perfetto and json.loads(gzip.decompress(perfetto[0].read_bytes()))["traceEvents"]


@pytest.mark.parametrize("spec", ["5", "a:b", "3:3", "4:2", "0:2", "1:2:3", ":4"])
def test_bad_spec_is_one_clear_error_before_anything_is_written(tmp_path, spec):
  with pytest.raises(ValueError, match="profile_steps=.*expected 'a:b' with 1 <= a < b"):
    train(small_config(2, tmp_path / "run", profile_steps=spec))
  assert not (tmp_path / "run").exists()


def test_parse():
  assert profiling.parse_profile_steps("") is None
  assert profiling.parse_profile_steps("10:12") == (10, 12)
