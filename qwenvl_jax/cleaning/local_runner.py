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
"""
import logging
import shlex
import sys

from apache_beam.portability import python_urns
from apache_beam.runners.portability.fn_api_runner import fn_runner

from qwenvl_jax.cleaning import failures

# Beam's command of a local worker process (FnApiRunner.run_pipeline) and ours.
_BEAM_WORKER = f"{sys.executable} -m apache_beam.runners.worker.sdk_worker_main"
_WORKER = f"{shlex.quote(sys.executable)} -m qwenvl_jax.cleaning.local_runner"
# The warning of every worker start about the main session that Dataflow stages (this job pickles none).
_START_UP_NOISE = "No semi_persistent_directory found"


class LocalRunner(fn_runner.FnApiRunner):
  """Beam's local engine, with worker processes started by `worker_main` (the module docstring says why)."""

  def run_via_runner_api(self, pipeline_proto, options):
    for environment in pipeline_proto.components.environments.values():
      if environment.urn == python_urns.SUBPROCESS_SDK and environment.payload.decode() == _BEAM_WORKER:
        environment.payload = _WORKER.encode()
    return super().run_via_runner_api(pipeline_proto, options)


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
