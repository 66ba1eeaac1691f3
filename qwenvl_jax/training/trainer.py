"""The training loop of all three stages: setup, resume, the jitted step on the mesh, metrics, checkpoints, signals.

```
distributed.initialize → workdir check → tokenizer → model config → mesh + rules
→ abstract model → shardings → stage optimizer → state: own checkpoint | config.init params | sharded init
→ grain iterator (restored with the state) → loop: next batch → global arrays → step → metrics / checkpoint
```
The loop holds no model logic (that is `step.py`) and no I/O format (that is `checkpointing.py` and
`metrics.py`). It stops on:
* `total_steps` reached: final checkpoint;
* SIGTERM / SIGINT (preemption, Ctrl-C): finishes the current step, saves, exits with status 'preempted'
  (multi-process runs agree on the step through JAX's preemption sync point, see `_PreemptionCheck`; at most one
  step is in flight, so that is the next step); `config.stop_at_step` does the
  same at a given step (a planned interruption: the schedule still runs to `total_steps`);
* a non-finite loss or gradient: raises `FloatingPointError` naming the step and the last good checkpoint; no
  checkpoint is written after the bad step (losses are checked before every save).
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from qwenvl_jax import data, distributed, errors, sharding
from qwenvl_jax.hardware import allocator
from qwenvl_jax.model import QwenVL, get_preset
from qwenvl_jax.training import experiment, flops, metrics, peft, profiling, validation, workdir as workdir_lib
from qwenvl_jax.training.checkpointing import Checkpointer, resolve_params_checkpoint
from qwenvl_jax.training.optimizer import make_is_frozen
from qwenvl_jax.training.setup import build_step, check_batch
from qwenvl_jax.training.step import TrainState


# eval_fn(step, model, *, cfg, tokenizer, mesh, rules) -> {name: score} on process 0, None elsewhere.
EvalFn = Callable[..., "dict[str, float] | None"]


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What a call to `train` did. status: 'completed' | 'preempted' | 'up_to_date'."""

  workdir: str
  step: int
  status: str
  last_checkpoint: int | None


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop polls (handlers only in the main thread; restored on exit).

  In a multi-process run with JAX's preemption service, SIGTERM belongs to JAX's own notifier (installed by
  `jax.distributed.initialize`; a Python handler would replace it), and the loop asks
  `reached_preemption_sync_point` instead: see `_PreemptionCheck`.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.requested = False
    self.signal = None
    self._signals = tuple(signals)
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    self.requested = True
    self.signal = signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _preemption_service() -> bool:
  """Whether JAX's preemption sync service runs (multi-process runs started with jax.distributed)."""
  if jax.process_count() == 1:
    return False
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top  (no public accessor)
  return jax_distributed.global_state.preemption_sync_manager is not None


class _PreemptionCheck:
  """Decides, identically on every process, whether to save and stop after a step.

  * one process: a SIGTERM/SIGINT received during a step stops after it;
  * several processes with JAX's preemption service: a SIGTERM on any host is propagated by the coordinator, and
    `reached_preemption_sync_point(step)` (called every step, as it requires) is True on every host at the same
    step, the first that all of them can still reach, i.e. the next one; a SIGINT (Ctrl-C, one terminal) is
    agreed on at the next log/checkpoint boundary with an all-gather, as is SIGTERM without the service.
  """

  def __init__(self):
    self.sync_point = _preemption_service()
    self.stop = _StopRequest((signal.SIGINT,) if self.sync_point else (signal.SIGTERM, signal.SIGINT))

  def __enter__(self):
    self.stop.__enter__()
    return self

  def __exit__(self, *exc):
    self.stop.__exit__(*exc)

  def __call__(self, step: int, boundary: bool) -> bool:
    if jax.process_count() == 1:
      return self.stop.requested
    if self.sync_point:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.stop.signal = "SIGTERM"
        return True
    return boundary and _any_process(self.stop.requested)


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def train(config: ml_collections.ConfigDict, eval_fn: EvalFn | None = None) -> TrainResult:
  """Runs (or resumes) the stage `config` describes. See `configs/stage1.py` for the fields.

  `eval_fn(step, model, cfg=, tokenizer=, mesh=, rules=)` (model: a `QwenVL` holding the step's parameters),
  called on every process every `config.eval_every`
  steps and at the last step, returns scores to log (process 0; None elsewhere). `python -m qwenvl_jax.train`
  builds it from `config.eval` (`evaluation.during_training`); training itself never imports evaluation.
  """
  validation.check_is_training_config(config)
  if config.get("eval_every", 0) and eval_fn is None:
    raise errors.ConfigError("config.eval_every > 0 needs an eval_fn: run `python -m qwenvl_jax.train`, which builds "
                             "it from config.eval, or pass train(config, eval_fn=...)")
  profiling.parse_profile_steps(config.get("profile_steps", ""))  # a bad spec fails before anything is written
  distributed.initialize(config.distributed)
  distributed.check_same_config(config)  # every host's flags: a difference hangs or trains each shard differently
  # Everything that can be checked is checked before the first file is written (no config.json, no checkpoints/
  # for a config that cannot run).
  workdir = workdir_lib.resolve(config)
  workdir_lib.check_usable(workdir)
  config = experiment.inherit_tokenizer(config, workdir)  # '' + config.init: the init weights' vocabulary
  validation.check_config(config)
  # What a failure found only later (every record of the data source bad, at the first batch) must not leave: a
  # config.json that refuses the corrected command and an empty checkpoints/ that looks like a run. Until the
  # first checkpoint exists, a failed start removes what it wrote, and nothing that was there before it.
  before = workdir_lib.contents(workdir)
  try:
    workdir_lib.create_shared(workdir)  # a folder local to each host failed at the first checkpoint
    ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    try:
      return _train(config, workdir, ckpt, eval_fn)
    finally:
      ckpt.close()  # waits for a save in flight: a checkpoint it completes keeps the workdir
  except BaseException:
    try:
      workdir_lib.remove_new(workdir, before)
    except OSError:
      pass  # the run's own error is what the user must see, not a failed clean-up of it
    raise


def _train(config: ml_collections.ConfigDict, workdir: str, ckpt: Checkpointer, eval_fn: EvalFn | None
           ) -> TrainResult:
  latest = ckpt.latest_step()
  # Check what can be checked without the tokenizer before the workdir records this config: a typo (unknown
  # preset, a mesh the devices cannot hold) must not leave a config.json that refuses the corrected command.
  get_preset(config.model).with_image_size(config.res)
  mesh, rules = experiment.make_mesh(config)
  check_batch(config, mesh, rules)
  forced = workdir_lib.check_and_record(workdir, config, latest)
  if latest is not None and latest >= config.total_steps:
    if jax.process_index() == 0:
      print(f"{workdir}: already trained to step {latest} >= config.total_steps={config.total_steps}; nothing to "
            "do (raise --config.total_steps to train further)", flush=True)
    return TrainResult(workdir, latest, "up_to_date", latest)
  tokenizer = experiment.make_tokenizer(config, workdir)
  cfg = experiment.make_model_config(config, tokenizer)

  setup = build_step(config, cfg, mesh, rules, seed=config.seed)
  abstract_state, state_shardings = setup.abstract_state, setup.state_shardings
  abstract_params, frozen, replicated = setup.abstract_params, setup.frozen, setup.replicated
  step_fn, shardings = setup.step_fn, setup.shardings
  opt_init = jax.jit(setup.tx.init, out_shardings=setup.opt_shardings)

  make_model = peft.model_fn(cfg, config, seed=config.seed)

  data_iter = data.make_train_iterator(
      config.data, tokenizer, process_index=jax.process_index(), process_count=jax.process_count(),
      global_batch=config.batch_size, seq_len=config.seq_len, max_images=config.max_images, image_size=config.res,
      stage=config.stage, image_tokens=cfg.image_tokens)

  writer = None
  profiler = profiling.StepProfiler(config.get("profile_steps", ""), workdir)
  try:
    writer_msgs = []
    if latest is not None:
      target = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), abstract_params,
                          setup.abstract_opt)
      # A damaged latest checkpoint (a truncated file) falls back to the newest intact one, with a warning.
      latest, state = ckpt.restore_latest_intact(target, data_iter, warn=writer_msgs.append)
      writer_msgs.append(f"resumed {workdir} from step {latest}")
      if forced:
        recorded = workdir_lib.record_resumed(workdir, config, latest)
        writer_msgs.append(f"the changed config is recorded in {recorded}")
    else:
      if config.init and peft.lora_config(config) is not None:
        source = resolve_params_checkpoint(config.init)
        quant = peft.base_quantization(config)
        params = peft.init_from_base(source, make_model, mesh, rules, quant=quant and quant[0])
        writer_msgs.append(f"{'QLoRA (' + quant[0].mode + ')' if quant else 'LoRA'} base from {source}; "
                           "adapters initialized (B = 0)")
      elif config.init:
        from qwenvl_jax.checkpoint import restore_params  # pylint: disable=g-import-not-at-top
        source = resolve_params_checkpoint(config.init)
        params = nnx.to_pure_dict(restore_params(source, abstract_state, state_shardings))
        writer_msgs.append(f"initialized parameters from {source}")
      else:
        params = nnx.to_pure_dict(nnx.state(sharding.init_sharded(make_model, mesh, rules)))
      state = TrainState(jax.device_put(jnp.int32(0), replicated), params, opt_init(params))

    start = int(jax.device_get(state.step))

    is_frozen = make_is_frozen(frozen)
    step_flops = flops.train_step_flops(cfg, batch=config.batch_size, seq_len=config.seq_len,
                                        max_images=config.max_images, is_trainable=lambda p: not is_frozen(p)).total
    peak = metrics.peak_flops_per_device(config.peak_flops_per_device)
    jitted = jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))
    writer = metrics.MetricsWriter(workdir, total_steps=config.total_steps, initial_step=start,
                                   tensorboard=config.tensorboard, progress_bar=config.progress_bar)
    for m in writer_msgs:
      writer.message(m)
    # On CPU the allocator matters to the step time (hardware/allocator.py); say which one this run has.
    on_cpu = f", allocator {allocator.in_use()}" if jax.default_backend() == "cpu" else ""
    trains = peft.trained_summary(config, setup.abstract_state) or f"frozen {list(frozen) or 'none'}"
    writer.message(f"stage {config.stage}: model {config.model} at {config.res} px, {trains}, "
                   f"mesh {dict(mesh.shape)}, {jax.process_count()} process(es){on_cpu}; writing to {workdir}")
    meta = {"stage": config.stage, "model": config.model, "res": config.res}
    tokens_per_step = config.batch_size * config.seq_len
    last_saved = latest
    pending: list[tuple[int, dict]] = []
    clock = {"time": None, "step": start}
    status = "completed"

    def flush(step: int) -> None:
      """Fetches the pending metrics (a host sync), stops on a non-finite loss, logs the latest step."""
      fetched = [(s, jax.device_get(m)) for s, m in pending]
      pending.clear()
      for s, m in fetched:
        if not m["finite"]:
          raise FloatingPointError(
              f"non-finite loss ({float(m['loss'])}) or gradient norm ({float(m['grad_norm'])}) at step {s}; "
              f"stopping. The last good checkpoint is step {last_saved} in {ckpt.directory}"
              if last_saved is not None else
              f"non-finite loss ({float(m['loss'])}) or gradient norm ({float(m['grad_norm'])}) at step {s}; "
              "stopping before any checkpoint was written")
      now = time.perf_counter()
      images = sum(float(m["images"]) for _, m in fetched)
      if clock["time"] is None:
        rates = metrics.throughput(steps=0, seconds=0, tokens_per_step=0, images=0, step_flops=0, num_devices=1,
                                   peak=None)  # the first interval includes compilation: no rates
      else:
        rates = metrics.throughput(steps=step - clock["step"], seconds=now - clock["time"],
                                   tokens_per_step=tokens_per_step, images=images, step_flops=step_flops,
                                   num_devices=jax.device_count(), peak=peak)
      clock.update(time=now, step=step)
      for s, m in fetched:
        if config.log_every == 1 or s == step:
          values = {k: float(m[k]) for k in ("loss", "grad_norm", "lr", "supervised_tokens")}
          writer.write(s, dict(values, **rates) if s == step else values)

    in_flight = None
    with _PreemptionCheck() as stop_check, sharding.use_rules(mesh, rules):
      for step in range(start + 1, config.total_steps + 1):
        batch = data.to_global_batch(next(data_iter), mesh, rules)
        profiler.before_step(step)
        state, step_metrics = jitted(state, batch)
        if in_flight is not None:
          # At most one step runs ahead of the host (async dispatch would otherwise queue many), so a stop request
          # is honoured after the next step rather than after every queued one; the device is never idle.
          jax.block_until_ready(in_flight)
        in_flight = step_metrics["loss"]
        ckpt.check_for_errors()  # a failed background save (disk full) stops the run now, not at the next save
        profiled = profiler.after_step(step, step_metrics)
        if profiled:
          writer.message(profiled)
        pending.append((step, step_metrics))
        writer.advance()
        boundary = step % config.log_every == 0 or step % config.checkpoint.every == 0
        done = step == config.total_steps
        stopping = stop_check(step, boundary) or step == config.stop_at_step
        if boundary or done or stopping:
          flush(step)
        if step % config.checkpoint.every == 0 or done or stopping:
          ckpt.save(step, state, data_iter, meta, force=True)
          last_saved = step
        if eval_fn is not None and not stopping and (step % config.eval_every == 0 or done):
          flush(step)
          model_state = jax.tree.map(lambda x: x, setup.abstract_state)
          nnx.replace_by_pure_dict(model_state, state.params)  # the step's arrays, not copies
          scores = eval_fn(step, nnx.merge(setup.graphdef, model_state), cfg=cfg, tokenizer=tokenizer, mesh=mesh,
                           rules=rules)
          writer.write_scores(step, scores or {})
          clock["time"] = time.perf_counter()  # throughput excludes the evaluation
        if stopping:
          status = "preempted"
          writer.message(f"stop requested: saved step {step} to {ckpt.directory}; rerun the same command to resume")
          break
    ckpt.wait()
    writer.message(f"{status} at step {step}; checkpoints in {ckpt.directory}, metrics in {writer.path}")
    return TrainResult(workdir, step, status, last_saved)
  finally:
    profiler.stop()  # a run that ended inside the profiled range
    if writer is not None:
      writer.close()
    # Stops grain's worker processes and frees their shared memory.
    data_iter.close()
