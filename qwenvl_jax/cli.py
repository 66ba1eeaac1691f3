"""How every entry point runs: `cli.run(main)` in place of `absl.app.run(main)`.

On top of absl it gives every command the same behaviour at its edges:
* a user mistake (`errors.UserError`, or an OS error about a path the user named: missing, existing, a folder for
  a file, no permission, disk full) prints one line `error: ...` (plus `  hint: ...`) on stderr and exits 2;
  anything else is an internal error and keeps its traceback. `QWENVL_TRACEBACK=1` shows the traceback of user
  mistakes too;
* a misspelt config override (`--config.optimizer.learning_rate=...`) names the unknown field and the closest
  existing ones ("did you mean optimizer.lr?") instead of ml_collections' bare `AttributeError`;
* XLA running out of accelerator memory (RESOURCE_EXHAUSTED, at compile time or allocation) is a sizing mistake:
  one line, with the planner and the flags that shrink a job as the hint (`device_memory_error`);
* `--help` / `--helpfull` exit 0 (absl exits 1);
* JAX's persistent compilation cache is on (`compilation_cache`: a rerun loads what the last run compiled);
* `--flag=~/path` means the home folder, as `--flag ~/path` does in a shell (`expand_home`).

`define_model_flags()` / `load_model_from_flags()` are the model-source flags of the commands that load a model
for inference (`generate`, `serve`: checkpoint, model, tokenizer, image size, chat format, dtype, quantization and
the inference layout), defined once here.
"""

from __future__ import annotations

import ast
import errno
import functools
import importlib.util
import logging
import os
import reprlib
import sys
from typing import Callable

from absl import app

from qwenvl_jax import compilation_cache, errors, sharding_rules
from qwenvl_jax.hardware import allocator

_HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "--helpfull", "--helpxml")
# OS errors that are about a path or resource the user controls (the message names the path).
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is a user mistake (printed as one line) rather than an internal error (a traceback)."""
  if isinstance(error, (errors.UserError, _USER_OS_ERRORS)):
    return True
  return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


DEVICE_MEMORY_HINT = ("python -m qwenvl_jax.plan --topology=... says what fits before a run: --config=... for "
                      "training, --inference=server=true,... for serve; lower the batch (or raise accum_steps), "
                      "serve's --num_slots / --prefill_batch / --max_images / --context, or quantize "
                      "(--quantize=int8, --kv_cache_dtype=int8)")


def device_memory_error(error: BaseException) -> errors.DeviceMemoryError | None:
  """`error` (or an error it was raised from) as one line when it is XLA running out of accelerator memory: its
  RESOURCE_EXHAUSTED at compile time ("Ran out of memory on HBM") or at allocation ("Out of memory while trying to
  allocate", "Error allocating device buffer"); None otherwise (a full disk, whose tensorstore error is also
  RESOURCE_EXHAUSTED, is `checkpointing`'s; an error raised while one was being handled, e.g. a bug in the
  planner's out-of-memory path, keeps its traceback). Sizes that do not fit are the user's to change, not a bug."""
  seen = set()
  while error is not None and id(error) not in seen:  # explicit chains only (`raise ... from e`, as the engine's)
    seen.add(id(error))
    text = str(error)
    lower = text.lower()
    if (type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in text
        and ("memory" in lower or "allocat" in lower) and "space left" not in lower):
      line = text[text.index("RESOURCE_EXHAUSTED"):].strip().splitlines()[0]
      return errors.DeviceMemoryError(f"out of accelerator memory: {line}", hint=DEVICE_MEMORY_HINT)
    error = error.__cause__
  return None


def report(error: BaseException) -> int:
  """Prints `error` as one user-facing message on stderr; returns the exit status to use."""
  print(errors.format_user_error(error), file=sys.stderr, flush=True)
  return errors.USER_ERROR_EXIT_CODE


def quiet_libraries() -> None:
  """Shows only warnings and errors of absl, orbax and JAX unless `--verbosity` was given.

  At INFO, orbax logs every restore step and JAX logs "Unable to initialize backend 'tpu'" on any machine without
  one: lines that bury a command's own output (the answer of `generate`).
  """
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  for name in ("jax", "jax._src.xla_bridge", "orbax", "absl"):
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None, *,
        cpu_allocator: bool = False) -> None:
  """`absl.app.run(main)` with the behaviour of the module docstring; never returns (exits).

  cpu_allocator: a CPU-only run first re-executes itself with mimalloc as its allocator (`hardware.allocator`;
  the trainer: XLA:CPU's per-step temporaries otherwise fault in anew every step).
  """
  if cpu_allocator:
    try:
      allocator.maybe_reexec()
    except allocator.AllocatorError as e:
      sys.exit(report(errors.UserError(str(e))))
  argv = expand_home(list(sys.argv if argv is None else argv))
  started = []

  @functools.wraps(main)
  def guarded(args):
    started.append(True)
    try:
      _check_config_files()
      compilation_cache.enable()
      return main(args)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr, flush=True)
      sys.exit(130)  # 128 + SIGINT, as a shell reports it
    except app.UsageError as e:  # absl would print the whole flag help above the one line that matters
      sys.exit(report(errors.ConfigError(str(e), hint="--helpshort lists the flags")))
    except Exception as e:  # pylint: disable=broad-except
      if not is_user_error(e):
        e = device_memory_error(e) or e
      if not is_user_error(e) or os.environ.get("QWENVL_TRACEBACK", "").lower() not in ("", "0", "false", "no"):
        raise
      sys.exit(report(e))

  try:
    app.run(guarded, argv=argv, flags_parser=_parse_flags)
  except SystemExit as e:
    if not started and e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
      sys.exit(0)
    raise
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # Raised while absl parses the flags (main has not started): ml_collections reports an unknown override
    # field as a bare AttributeError / KeyError.
    message = None if started else config_override_error(argv)
    if message is None:
      raise
    sys.exit(report(errors.ConfigError(message)))


# Flags whose value is free text, never a path: a leading ~ there is the user's text.
_TEXT_FLAGS = frozenset({"prompt", "system", "api_key", "served_model_name", "host"})


def expand_home(argv: list[str]) -> list[str]:
  """argv with a leading `~` of a flag's value expanded as the shell expands a word of its own: a shell leaves
  `--workdir=~/run` as is (no expansion after `=`), and the job used to write into a folder named `~` under the
  current one. Also `KIND:~/path` specs (`qwen:~/qwen.tiktoken`, `jsonl:~/data.jsonl`, `params:~/ckpt`)."""
  out = list(argv[:1])
  for a in argv[1:]:
    name, eq, value = a.partition("=")
    if a.startswith("-") and eq and name.lstrip("-").split(".")[-1] not in _TEXT_FLAGS:
      a = f"{name}={','.join(_expand_item(item) for item in value.split(','))}"  # list flags: each item
    out.append(a)
  return out


def _expand_item(value: str) -> str:
  kind, colon, rest = value.partition(":")
  if value == "~" or value.startswith("~/"):
    return os.path.expanduser(value)
  if colon and kind.isidentifier() and (rest == "~" or rest.startswith("~/")):
    return f"{kind}:{os.path.expanduser(rest)}"
  return value


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag value reported as one `error:` line and exit 2 (absl prints "FATAL Flags
  parsing error", for a config file's own ValueError the whole traceback, and exits 1)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  message = _config_file_error(argv)
  if message is not None:
    sys.exit(report(errors.ConfigError(message, hint=_CONFIG_FILE_HINT)))
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_drop_returned_none_warning)  # _config_value_error says it in its one line
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    # A required config flag whose get_config() returned None fails absl's check for a value (one raising
    # leaves None too, and its traceback in the message).
    message = _config_value_error(argv) if "other than None" in str(e) and "Traceback" not in str(e) else None
    sys.exit(report(errors.ConfigError(message, hint=_CONFIG_FILE_HINT) if message else
                    errors.ConfigError(_flag_error_line(str(e)), hint="--helpshort lists the flags")))
  finally:
    absl_logger.removeFilter(_drop_returned_none_warning)
  message = _config_value_error(argv)
  if message is not None:
    sys.exit(report(errors.ConfigError(message, hint=_CONFIG_FILE_HINT)))
  return rest


_CONFIG_FILE_HINT = ("a config file is a Python file defining get_config(), such as configs/stage2.py or "
                     "configs/eval/flickr.py")


def _drop_returned_none_warning(record: logging.LogRecord) -> bool:
  return "returned None" not in record.getMessage()


def _config_flags_given(argv: list[str]):
  """(name, value) of each `--NAME=FILE[:ARG]` config-file flag in argv."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for a in argv[1:]:
    name, eq, value = a.lstrip("-").partition("=")
    if eq and name in flags.FLAGS and type(flags.FLAGS[name]).__name__ == "_ConfigFlag":
      yield name, value


def _config_value_error(argv: list[str]) -> str | None:
  """The message for a config file whose get_config() returned something other than a ConfigDict (None, a dict,
  a number), or None. ml_collections takes any value: None fails absl's "must have a value" check with a warning
  above it, anything else a later `"stage" in config` with a TypeError traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for name, value in _config_flags_given(argv):
    # A missing file loads as ml_collections' error placeholder, which `_check_config_files` reports.
    if os.path.isfile(value.partition(":")[0]) and not _is_config(flags.FLAGS[name].value):
      return _not_a_config(name, value, flags.FLAGS[name].value)
  return None


def _is_config(value) -> bool:
  import ml_collections  # pylint: disable=g-import-not-at-top
  return isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict))


def _not_a_config(name: str, spec: str, got) -> str:
  what = "None (a missing return statement?)" if got is None else f"{reprlib.repr(got)} ({type(got).__name__})"
  return f"--{name}={spec}: get_config() returned {what}, not an ml_collections.ConfigDict"


def _config_file_error(argv: list[str]) -> str | None:
  """The message for a `--NAME=FILE[:ARG]` config-file flag whose file is no Python or defines no get_config(),
  or None. ml_collections raises the SyntaxError / AttributeError of importing it out of absl's flag parsing (a
  40-line traceback); a missing file is reported by `_check_config_files`."""
  for name, value in _config_flags_given(argv):
    path = value.partition(":")[0]
    if not os.path.isfile(path):
      continue
    try:
      with open(path, "rb") as f:
        tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError) as e:  # ValueError: null bytes (a binary file)
      where = (f" (line {e.lineno}: {e.msg})" if getattr(e, "lineno", None) else
               f" ({getattr(e, 'msg', None) or e})")
      return f"--{name}={value}: {path} is not a Python config file{where}"
    bound = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    bound |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
              for a in n.names}
    if "get_config" not in bound and not any(  # `from module import *` may bring it
        isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in ast.walk(tree)):
      return f"--{name}={value}: {path} defines no get_config()"
  return None


def _flag_error_line(message: str) -> str:
  """One line of absl's flag error: the flag it names and, when the message holds a traceback (a config file's
  get_config raised), the exception's own message instead of the traceback."""
  lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
  if not any(line.startswith("Traceback") for line in lines):
    return " ".join(lines)
  flag = lines[0].split(": Error whilst parsing", 1)[0]
  last = lines[-1]
  kind, sep, rest = last.partition(": ")
  if sep and kind.replace(".", "").replace("_", "").isalnum() and kind[:1].isupper():
    last = rest  # "ValueError: config arg ..." -> "config arg ..."
  return f"{flag}: {last}"


def _check_config_files() -> None:
  """A config file flag (`--config=FILE`) that failed to load holds a stand-in that raises, on first use in main,
  an OSError about no path; here it is one line naming the file."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  for name in list(flags.FLAGS):
    value = flags.FLAGS[name].value
    if type(value).__name__ != "_ErrorConfig":  # ml_collections.config_flags' stand-in for a failed load
      continue
    error = vars(value).get("_error")
    detail = [line.strip() for line in str(error).splitlines() if line.strip()]
    raise errors.UserFileNotFoundError(f"--{name}: cannot load the config file ({detail[-1] if detail else error})")


def config_override_error(argv: list[str]) -> str | None:
  """The message for the first `--NAME.path=value` override of argv whose path is not a field of the config that
  `--NAME=FILE[:ARG]` loads (with the closest existing field names), or None when every override is a field."""
  files = {}
  for a in argv[1:]:
    name, eq, value = a.lstrip("-").partition("=")
    if eq and "." not in name and (value.endswith(".py") or ".py:" in value):
      files[name] = value
  for a in argv[1:]:
    key = a.lstrip("-").partition("=")[0]
    base, dot, path = key.partition(".")
    if not dot or base not in files:
      continue
    try:
      config = _load_config(files[base])
    except Exception:  # pylint: disable=broad-except  (the config file's own error shows elsewhere)
      return None
    if not _is_config(config):
      return _not_a_config(base, files[base], config)
    node, walked = config, []
    for part in path.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(walked)
        close = errors.closest(part, keys)
        prefix = f"{base}.{where}." if where else f"{base}."
        hint = f"; did you mean {', '.join('--' + prefix + c for c in close)}?" if close else ""
        scope = f"{base}.{where}" if where else base
        return (f"--{key}: {scope} has no field {part!r}{hint} (fields of {scope}: {', '.join(sorted(keys))})"
                if keys else f"--{key}: {scope} is a value, not a group of fields")
      node, walked = node[part], walked + [part]
  return None


def _load_config(spec: str):
  """`get_config(arg)` of the config file `PATH[:ARG]`, loaded by path as ml_collections' config_flags does."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_qwenvl_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if arg:
    return module.get_config(arg)
  try:
    return module.get_config()
  except TypeError:  # get_config(arg) with a required argument: config_flags passes None when there is none
    return module.get_config(None)


def define_model_flags() -> None:
  """Defines the model-source and layout flags of `generate` and `serve` (once per process: idempotent)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if "checkpoint" in flags.FLAGS:
    return
  flags.DEFINE_string("checkpoint", None, "A training run directory (its latest step), <run>@<step> or "
                      "<run>/checkpoints/<step>, or a params checkpoint directory; omit to run random weights "
                      "(smoke tests).")
  flags.DEFINE_string("model", None, "Architecture preset: qwen_vl_7b, mid, small or tiny (default: the run's, "
                      "else qwen_vl_7b).")
  flags.DEFINE_string("tokenizer", None, "Tokenizer spec: qwen:PATH, sentencepiece:PATH, or a .tiktoken / .model "
                      "file (default: the run's).")
  flags.DEFINE_integer("image_size", None, "Input resolution (default: the run's, else the preset's).")
  flags.DEFINE_enum("chat_format", None, ["chatml", "raw"], "chatml (chat models) or raw (base model); default: "
                    "the run's (stage 3: chatml, else raw), else chatml.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
  flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"],
                    "Weight-only quantization at load time (int8 per channel, int4 per group). A checkpoint written "
                    "by `convert --mode=quantize` loads quantized as stored.")
  flags.DEFINE_integer("group_size", 128, "int4 group size along each kernel's contracted axis.")
  flags.DEFINE_string("rules", sharding_rules.INFERENCE_DEFAULT, "Sharding rule table of qwenvl_jax/sharding_rules.py: "
                      "inference_tp (tensor parallel within a host, replicas across hosts) or fsdp (as training: "
                      "every decoded token all-gathers the weights).")
  flags.DEFINE_integer("tensor_parallel", 0, "Chips holding one model replica (heads, MLP and vocabulary split "
                       "over them); the other devices hold further replicas. 0 = one host's chips (the largest "
                       "degree the model allows).")
  flags.DEFINE_enum("attention", "xla", ["xla", "splash"], "Attention of the image encoder and the prompt prefill: "
                    "xla (the reference's numerics, any backend) or splash (the TPU kernel: no [heads, P, P] scores "
                    "in memory, so longer prompts and more requests per prefill fit; other low bits than the "
                    "reference's). Decode steps run xla either way.")


def model_source_from_flags():
  """The `model_source.ModelSource` the flags of `define_model_flags` name, checked (nothing is loaded: a command
  checks what depends on it, e.g. its chat format, before the weights load, which takes minutes at full size).

  Raises:
    errors.ConfigError: a bad size flag, no tokenizer for a params checkpoint, a preset that does not fit the
    checkpoint. FileNotFoundError: a missing path.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from qwenvl_jax.inference import loading, model_source  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  loading.check_attention(f.attention)  # --attention=splash off a TPU: one line, before anything is read
  # 0 used to mean "not given" (the checkpoint's resolution, int4 groups of 128) without a word.
  if f.image_size is not None and f.image_size <= 0:
    raise errors.ConfigError(f"--image_size={f.image_size} must be a positive multiple of the patch size",
                             hint="omit it for the checkpoint's own resolution")
  if f.group_size <= 0:
    raise errors.ConfigError(f"--group_size={f.group_size} must be >= 1")
  if f["group_size"].present and f.quantize != "int4":
    raise errors.ConfigError(f"--group_size is the group size of int4 weights: --quantize={f.quantize} ignores it",
                             hint="--quantize=int4 --group_size=N")
  source = model_source.resolve(f.checkpoint, model=f.model, tokenizer=f.tokenizer, image_size=f.image_size,
                                chat_format=f.chat_format)
  if not source.tokenizer:
    if not f.checkpoint:
      raise errors.ConfigError("--tokenizer is required without --checkpoint (random weights)",
                               hint="e.g. --tokenizer=qwen:qwen.tiktoken or --tokenizer=sp.model")
    raise errors.ConfigError("--tokenizer is required: --checkpoint is neither a training run nor a checkpoint "
                             "that records its tokenizer (convert copies the source's qwen.tiktoken into it)",
                             hint="e.g. --tokenizer=qwen:qwen.tiktoken or --tokenizer=sp.model")
  return source


def load_model_from_flags(source=None):
  """What the flags of `define_model_flags` name (`source`: `model_source_from_flags()`'s, if already read),
  loaded for inference.

  Returns:
    (model_source.ModelSource, tokenizer, QwenVLConfig, mesh, rules, QwenVL).
  Raises:
    errors.ConfigError: as `model_source_from_flags`, or a tensor-parallel degree the model or the devices do not
    allow. FileNotFoundError: a missing path.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from qwenvl_jax.inference import loading  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  source = source or model_source_from_flags()
  if not f.checkpoint:
    print(f"note: no --checkpoint: random weights of the {source.preset} preset (a smoke test, not a model's "
          "answers)", file=sys.stderr, flush=True)
  tok, cfg, mesh, rules, model = loading.load_source(
      source, dtype=f.dtype, rules=f.rules, tensor_parallel=f.tensor_parallel, seed=f.seed, quantize=f.quantize,
      group_size=f.group_size, attention=f.attention)
  return source, tok, cfg, mesh, rules, model
