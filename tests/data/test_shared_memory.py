"""Worker processes' shared memory is released: no 'leaked shared_memory objects' warning at exit (issue 17)."""
import sys

import pytest

from tests import background
from tests.conftest import REPO_ROOT

_SCRIPT = """
from qwenvl_jax.data.config import default_data_config
from qwenvl_jax.data.pipeline import make_train_iterator
from tests.data.helpers import ByteTokenizer

if __name__ == "__main__":
  c = default_data_config(2)
  c.num_workers, c.read_threads = 2, 1
  it = make_train_iterator(c, ByteTokenizer(), process_index=0, process_count=1, global_batch=2, seq_len=256,
                           max_images=3, image_size=16, stage=2, image_tokens=4)
  batches = [next(it) for _ in range(5)]  # alive until the interpreter exits, like the trainer's last batch
  it.close()
  print("done", flush=True)
"""


def _exit_run(folder):
  """The script as the command of a job registered in tests/background.py (run from the session's start on the core
  the other tests leave idle), with a bare environment."""
  script = folder / "run.py"
  script.write_text(_SCRIPT)
  return [background.Command([sys.executable, str(script)],
                             {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
                             REPO_ROOT, check=False)]


exit_run = background.finished_work(__name__, "exit_run", _exit_run)


@pytest.mark.slow
def test_batches_alive_at_exit_leak_no_shared_memory(exit_run):
  _, (proc,) = exit_run
  assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]
  assert "leaked shared_memory" not in proc.stderr, proc.stderr[-3000:]
