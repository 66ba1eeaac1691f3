"""One evaluation job per results file: a second is refused naming the first; a killed job blocks no rerun."""
import os
import signal
import socket

import pytest

from qwenvl_jax.evaluation import output_lock


def test_a_second_job_on_one_output_is_refused_naming_the_first(tmp_path):
  folder, out = tmp_path / "out.json.partial", tmp_path / "out.json"
  first = output_lock.OutputLock(folder)
  first.acquire(out)
  with pytest.raises(output_lock.OutputBusyError,
                     match=rf"another evaluation job \(pid {os.getpid()} on {socket.gethostname()}\) is writing the "
                           rf"results {out} \(its ledgers in {folder}\)") as refused:
    output_lock.OutputLock(folder).acquire(out)
  assert "--config.output" in refused.value.hint
  first.release()
  assert not folder.exists()  # it held nothing else
  second = output_lock.OutputLock(folder)
  second.acquire(out)
  (folder / "process-00000.jsonl").write_text('{"id": 1, "prediction": "a"}\n')
  second.release()
  assert [p.name for p in folder.iterdir()] == ["process-00000.jsonl"]  # the ledgers stay, the lock file goes


def test_a_job_killed_with_sigkill_leaves_no_lock_that_blocks_the_rerun(tmp_path):
  folder, out = tmp_path / "out.json.partial", tmp_path / "out.json"
  ready_r, ready_w = os.pipe()
  pid = os.fork()
  if pid == 0:  # the first job: takes the lock and runs until it is killed
    try:
      output_lock.OutputLock(folder).acquire(out)
      os.write(ready_w, b"1")
      signal.pause()
    finally:
      os._exit(1)  # pylint: disable=protected-access
  os.close(ready_w)  # a child that fails ends the read below
  try:
    assert os.read(ready_r, 1) == b"1"
    with pytest.raises(output_lock.OutputBusyError, match=rf"\(pid {pid} on "):
      output_lock.OutputLock(folder).acquire(out)
  finally:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(ready_r)
  assert (folder / output_lock.LOCK_FILE).exists()  # its file stays, its lock went with the process
  rerun = output_lock.OutputLock(folder)
  rerun.acquire(out)
  rerun.release()
