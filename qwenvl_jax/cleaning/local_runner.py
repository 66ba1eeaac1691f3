"""The cleaning job's local Beam engine: Beam's FnApiRunner, whose worker processes log only through the job.

`LocalRunner` is the engine `pipeline.local_runner_if_direct` names for the DirectRunner (it honours
`direct_num_workers` and `direct_running_mode` as the DirectRunner does). With `direct_running_mode=multi_processing`
each worker is a Python process that Beam starts with `python -m apache_beam.runners.worker.sdk_worker_main`; such a
worker prints every record of its own at INFO on stderr (Beam's import notice gives it a stderr handler, and the
harness sets the INFO level), ~20 lines per worker per run, besides sending each record to the job's process, and
prints the traceback of a failed bundle, a user error's too. `LocalRunner` starts its workers with `python -m
qwenvl_jax.cleaning.local_runner` instead (`worker_main`): the same harness, whose records reach the console only
through the job's process, under its logging settings (Beam's warnings and errors by default; all of them at
`--verbosity=0`); its own stderr prints only what goes wrong before that channel is up, and never the traceback of
a failure that ends as one line (`failures`).

Ctrl-C reaches the job's process and its workers alike (one process group). The job's process prints "interrupted"
and exits 130, but around that line came 90-160 lines of tracebacks: each worker's (the harness's KeyboardInterrupt,
on its stderr and again through the job's log, or an import cut short while it started) and those of the job's
process's Beam threads as their workers vanished (the worker's exit code, gRPC streams that broke, handlers that
could not close). A worker now leaves at once and quietly on SIGINT, from its first line on (`_WORKER`), and once
the job's process is interrupted it drops what its Beam threads raise and Beam logs (`quiet_after_interrupt`).
"""
import logging
import re
import shlex
import signal
import sys
import threading

from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import fn_runner

from qwenvl_jax.cleaning import failures

# Beam's command of a local worker process (FnApiRunner.run_pipeline) and ours.
_BEAM_WORKER = f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main"
# The SIGINT handler comes first: importing the package takes seconds, and Ctrl-C then printed an import traceback.
_WORKER = (f"{shlex.quote(sys.executable)} -c " + shlex.quote(
    "import os, signal; signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum)); "
    "from qwenvl_jax.cleaning import local_runner; local_runner.worker_main()"))
# The warning of every worker start about the main session that Dataflow stages (this job pickles none).
_START_UP_NOISE = "No semi_persistent_directory found"


# What Beam's `run_worker` thread raises for a worker that exited 128 + SIGINT (its handler) or was killed by SIGINT
# (the `sh -c` Beam starts it through may be); it can come before this process handles its own SIGINT.
_INTERRUPTED_WORKER = re.compile(
    rf"^Worker subprocess exited with return code ({128 + signal.SIGINT}|-{signal.SIGINT})$")
_interrupted = threading.Event()  # this process has had a SIGINT while the local engine ran


class LocalRunner(fn_runner.FnApiRunner):
  """Beam's local engine, with worker processes started by `worker_main` (the module docstring says why)."""

  def run_via_runner_api(self, pipeline_proto, options):
    for environment in pipeline_proto.components.environments.values():
      if environment.urn == python_urns.SUBPROCESS_SDK and environment.payload.decode() == _BEAM_WORKER:
        environment.payload = _WORKER.encode()
        quiet_after_interrupt()
    return super().run_via_runner_api(pipeline_proto, options)


def quiet_after_interrupt() -> None:
  """Once per process (it stays installed: Beam's threads report after the job's own KeyboardInterrupt, while the
  command exits): a SIGINT still raises KeyboardInterrupt in the main thread as before, and from then on Beam's
  loggers are silenced and what a thread raises is dropped; before it, only the error of a worker that a SIGINT
  ended is. Every other record and thread exception is reported as before. The handler is installed only from the
  main thread (Python allows no other)."""
  previous_hook = threading.excepthook
  if getattr(previous_hook, "qwenvl_quiet_after_interrupt", False):
    return

  def hook(args):
    if _interrupted.is_set() or (isinstance(args.exc_value, RuntimeError)
                                 and _INTERRUPTED_WORKER.match(str(args.exc_value))):
      return
    previous_hook(args)
  hook.qwenvl_quiet_after_interrupt = True
  threading.excepthook = hook
  if threading.current_thread() is not threading.main_thread():
    return
  previous_handler = signal.getsignal(signal.SIGINT)

  def on_interrupt(signum, frame):
    _interrupted.set()
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL + 1)  # its loggers inherit the level
    if callable(previous_handler):
      previous_handler(signum, frame)
    elif previous_handler != signal.SIG_IGN:
      raise KeyboardInterrupt
  signal.signal(signal.SIGINT, on_interrupt)


def _keep_on_stderr(record: logging.LogRecord) -> bool:
  """Whether a worker's own stderr shows `record`: only until the harness sends records to the job's process."""
  from apache_beam.runners.worker.log_handler import FnApiLogRecordHandler  # pylint: disable=import-outside-toplevel
  return (not any(isinstance(h, FnApiLogRecordHandler) for h in logging.getLogger().handlers)
          and failures.keep_record(record))


def _drop_start_up_noise(record: logging.LogRecord) -> bool:
  return _START_UP_NOISE not in record.getMessage()


def worker_main() -> None:
  """A worker process of `LocalRunner`: Beam's SDK harness (`sdk_worker_main`), with its console output as the
  module docstring says."""
  root = logging.getLogger()
  for handler in list(root.handlers):  # the stderr handler Beam's import notice made (logging.basicConfig)
    root.removeHandler(handler)
  handler = logging.StreamHandler(sys.stderr)
  handler.setLevel(logging.WARNING)
  handler.addFilter(_keep_on_stderr)
  root.addHandler(handler)
  from apache_beam.runners.worker import sdk_worker_main  # pylint: disable=import-outside-toplevel
  logging.getLogger(sdk_worker_main.__name__).addFilter(_drop_start_up_noise)
  sys.stderr = failures.QuietStream(sys.stderr)  # the harness prints a failed bundle's traceback itself
  sdk_worker_main.main(sys.argv)


if __name__ == "__main__":
  worker_main()
