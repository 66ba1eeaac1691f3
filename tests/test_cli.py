"""The entry points' edges (qwenvl_jax/cli.py): user mistakes as one line and exit 2, config typos with a
suggestion, --help exiting 0, internal errors keeping their traceback."""
import concurrent.futures
import subprocess
import sys

import pytest
from absl import flags

from qwenvl_jax import cli, errors
from tests import background
from tests.conftest import REPO_ROOT
from tests.training import helpers

ENTRY_POINTS = ("train", "generate", "evaluate", "serve", "clean", "convert", "plan")


@pytest.fixture(autouse=True)
def _no_foreign_flag_validators(monkeypatch):
  """Other test modules import entry points whose absl flags are required (generate's --prompt); `cli.run` parses
  the process-global flags, so their validators would end these in-process runs with a flags error."""
  for name in list(flags.FLAGS):
    monkeypatch.setattr(flags.FLAGS[name], "validators", [])


def _run_main(main, argv=("prog",)):
  with pytest.raises(SystemExit) as info:
    cli.run(main, list(argv))
  return info.value.code


@pytest.mark.parametrize("traceback_env", [None, "0", "false"])
def test_a_user_error_is_one_line_and_exit_2(capsys, monkeypatch, traceback_env):
  if traceback_env is not None:  # QWENVL_TRACEBACK=0 used to turn tracebacks on (any non-empty value did)
    monkeypatch.setenv("QWENVL_TRACEBACK", traceback_env)
  def main(argv):
    del argv
    raise errors.UserFileExistsError("out.json already exists", "choose another --output")
  assert _run_main(main) == errors.USER_ERROR_EXIT_CODE
  err = capsys.readouterr().err
  assert err == "error: out.json already exists\n  hint: choose another --output\n"


def test_an_os_error_about_a_user_path_is_one_line(capsys, tmp_path):
  def main(argv):
    del argv
    open(tmp_path / "missing" / "x.json", encoding="utf-8")
  assert _run_main(main) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "x.json" in err and "Traceback" not in err and err.count("\n") == 1


def test_an_internal_error_keeps_its_traceback():
  def main(argv):
    del argv
    raise KeyError("a bug")
  with pytest.raises(KeyError, match="a bug"):
    cli.run(main, ["prog"])


def test_running_out_of_accelerator_memory_is_one_line_with_the_planner_as_hint(capsys):
  """XLA's RESOURCE_EXHAUSTED (a batch, slot count or context too large for the chip) was a traceback of several
  hundred lines, at compile time or when the serving engine's warm-up failed; the sizes are the user's to change.
  The engine wraps its thread's error in a RuntimeError: the chain is followed."""
  import jax  # pylint: disable=import-outside-toplevel
  xla = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                   "HLO temporaries (19.23G) exceeds available HBM (15.75G).\nmore details")

  def main(argv):
    del argv
    try:
      raise xla
    except jax.errors.JaxRuntimeError as e:
      raise RuntimeError(f"the engine failed to start: {e}") from e

  assert _run_main(main) == errors.USER_ERROR_EXIT_CODE
  err = capsys.readouterr().err
  assert err.startswith("error: out of accelerator memory: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total "
                        "memory required for HLO temporaries (19.23G) exceeds available HBM (15.75G).\n  hint: "
                        "python -m qwenvl_jax.plan --topology=... says what fits"), err
  assert err.count("\n") == 2 and "more details" not in err
  gpu = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8589934592 bytes.")
  assert isinstance(cli.device_memory_error(gpu), MemoryError)


def _raised_while_handling_an_oom() -> KeyError:
  import jax  # pylint: disable=import-outside-toplevel
  try:
    try:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM")
    except jax.errors.JaxRuntimeError:
      raise KeyError("a bug in the code that handles it")  # pylint: disable=raise-missing-from
  except KeyError as e:
    return e


@pytest.mark.parametrize("error", [
    RuntimeError("RESOURCE_EXHAUSTED: Error writing local file: [OS error: No space left on device]"),  # tensorstore
    RuntimeError("RESOURCE_EXHAUSTED: Cannot allocate memory"),  # host memory, not XLA's
    RuntimeError("Out of memory"),
    _raised_while_handling_an_oom(),  # a bug, however it arose: its traceback stays
])
def test_other_exhausted_resources_keep_their_traceback(error):
  assert cli.device_memory_error(error) is None

  def main(argv):
    del argv
    raise error
  with pytest.raises(type(error)):
    cli.run(main, ["prog"])


def test_config_override_typo_suggests_the_field(tmp_path):
  config = tmp_path / "c.py"
  config.write_text("import ml_collections\n"
                    "def get_config(arg=None):\n"
                    "  c = ml_collections.ConfigDict()\n"
                    "  c.optimizer = ml_collections.ConfigDict({'lr': 1.0, 'min_lr': 0.1, 'b1': 0.9})\n"
                    "  c.seed = 0\n"
                    "  return c\n")
  argv = ["prog", f"--config={config}", "--config.optimizer.learning_rate=3", "--config.seed=1"]
  message = cli.config_override_error(argv)
  assert message.startswith("--config.optimizer.learning_rate: config.optimizer has no field 'learning_rate'; "
                            "did you mean --config.optimizer.lr")
  assert "seeds" in cli.config_override_error(["prog", f"--config={config}:x", "--config.seeds=1"])
  assert cli.config_override_error(["prog", f"--config={config}", "--config.optimizer.lr=3"]) is None


@pytest.mark.slow
def test_train_with_bad_input_prints_one_line_and_writes_nothing(tmp_path):
  """The issue's cases through the real command: res=0 and a nested typo; the corrected command is not blocked."""
  env = helpers.subprocess_env()
  base = [sys.executable, "-m", "qwenvl_jax.train", f"--config={REPO_ROOT / 'configs' / 'stage1.py'}"]
  cases = ((["--config.res=0"], "config.res=0 must be an integer >= 1"),
           (["--config.optimizer.learning_rate=1e-3"], "did you mean --config.optimizer.lr?"))
  workdirs = [tmp_path / f"run{i}" for i in range(len(cases))]  # one each: they run at once

  def train(i):
    return subprocess.run(base + [f"--workdir={workdirs[i]}"] + cases[i][0], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # each is a process start: overlap them
    procs = list(pool.map(train, range(len(cases))))
  for (_, expected), proc, workdir in zip(cases, procs, workdirs):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()


_STAGE2 = f"--config={REPO_ROOT / 'configs' / 'stage2.py'}"
_FLAG_MISTAKES = [  # (train's flags, what the error line says; {folder}: the job's folder)
    ([_STAGE2 + ":fix_vit=maybe"], "config arg fix_vit='maybe' is not a boolean"),
    ([_STAGE2 + ":modle=tiny"], "unknown config arg keys ['modle']"),
    ([_STAGE2, "--config.batch_size=abc"], "flag --config.batch_size=abc: invalid literal for int()"),
    (["--config={folder}/stage9.py"], "--config: cannot load the config file"),
    ([_STAGE2, "--helpme"], "Unknown command line flag 'helpme'"),
    ([_STAGE2, "extra"], "unexpected arguments: ['extra']"),
    # A file that is no config: ml_collections' SyntaxError / AttributeError tracebacks (40-56 lines).
    ([f"--config={REPO_ROOT / 'README.md'}"], "README.md is not a Python config file (line 3: "),
    (["--config={folder}/noget.py"], "noget.py defines no get_config()"),
    # get_config() returning no ConfigDict: absl's "must have a value other than None" under a warning, or a
    # TypeError traceback from the first `"stage" in config`.
    (["--config={folder}/none.py"], "none.py: get_config() returned None (a missing return"),
    (["--config={folder}/none.py", "--config.model=tiny"], "none.py: get_config() returned None"),
    (["--config={folder}/dict.py"], "dict.py: get_config() returned {'model': 'tiny'} (dict), not an")]


def _flag_mistakes(folder):
  """One `python -m qwenvl_jax.train --workdir=FOLDER/run` per case of `_FLAG_MISTAKES` (a process start each):
  commands of a job registered in tests/background.py, run from the session's start on the core the other tests
  leave idle."""
  (folder / "noget.py").write_text("x = 1\n")
  (folder / "none.py").write_text("def get_config():\n  pass\n")
  (folder / "dict.py").write_text("def get_config():\n  return {'model': 'tiny'}\n")
  env = helpers.subprocess_env()
  return [background.Command([sys.executable, "-m", "qwenvl_jax.train", f"--workdir={folder / 'run'}",
                              *(flag.format(folder=folder) for flag in extra)], env, folder, check=False)
          for extra, _ in _FLAG_MISTAKES]


flag_mistakes = background.finished_work(__name__, "flag_mistakes", _flag_mistakes)


def test_flag_and_config_file_mistakes_are_one_line_and_exit_2(flag_mistakes):
  """What absl reports as "FATAL Flags parsing error" (with a config file's traceback inside), a config file that
  does not load (an OSError about no path, raised in main), stray arguments (after the whole flag help) — all exit
  1 or with a traceback under absl alone — are one `error:` line and exit 2 here, and write nothing."""
  folder, procs = flag_mistakes
  assert len(procs) == len(_FLAG_MISTAKES)
  for (extra, expected), proc in zip(_FLAG_MISTAKES, procs):
    assert proc.returncode == 2, (extra, proc.stderr[-3000:])
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: ") and expected in lines[0], (extra, proc.stderr[-3000:])
    assert len(lines) <= 2 and "Traceback" not in proc.stderr and not (folder / "run").exists(), (extra, proc.stderr)


def test_a_leading_tilde_of_a_path_flag_is_the_home_folder(monkeypatch):
  """A shell leaves `--workdir=~/run` alone (no expansion after `=`): the run went into a folder named `~`."""
  monkeypatch.setenv("HOME", "/home/u")
  argv = ["prog", "--workdir=~/run", "--config.tokenizer=qwen:~/q.tiktoken", "--config.data.source=jsonl:~",
          "--prompt=~/not a path", "--system=~/text", "--config.data.system=~/text, too", "--checkpoint=/a/~/b",
          "--x=gs://b/~/c", "--input=~/a.jsonl,~/b.jsonl", "~/positional"]
  assert cli.expand_home(argv) == [
      "prog", "--workdir=/home/u/run", "--config.tokenizer=qwen:/home/u/q.tiktoken",
      "--config.data.source=jsonl:/home/u", "--prompt=~/not a path", "--system=~/text",
      "--config.data.system=~/text, too", "--checkpoint=/a/~/b", "--x=gs://b/~/c",
      "--input=/home/u/a.jsonl,/home/u/b.jsonl", "~/positional"]


def _libtpu_installed() -> bool:
  from qwenvl_jax.planning import mesh  # pylint: disable=import-outside-toplevel
  return mesh.libtpu_available()


MISTAKES = [
    ("plan", ["--config=configs/stage2.py", "--topology=v9x-128"], "--topology=v9x-128: unknown chip 'v9x'"),
    ("plan", ["--preset=huge"], "unknown model preset 'huge'"),
    ("plan", ["--preset=tiny", "--res=300"], "image_size 300 is not a positive multiple of patch_size 14"),
    ("plan", ["--config=configs/stage2.py", "--search"], "--search ranks layouts for a TPU slice: give --topology"),
    ("plan", ["--config=configs/stage2.py:model=qwen_vl_7b", "--topology=v5p-128"], "needs libtpu"),
    ("evaluate", ["--config=configs/eval/flickr.py:task=nosuch", "--config.output=o.json"],
     "unknown evaluation task 'nosuch'"),
    ("evaluate", ["--config=configs/eval/flickr.py", "--config.output=o.json", "--config.per_device_batch_size=0"],
     "config.per_device_batch_size=0 must be an integer >= 1"),
    ("evaluate", ["--config=configs/eval/flickr.py", "--config.output=o.json", "--config.max_examples=-1"],
     "config.max_examples=-1 must be an integer >= 0"),
    ("evaluate", ["--config=configs/eval/vqav2_val.py", "--config.output=o.json", "--config.data_path=synthetic"],
     "has no synthetic held-out set"),
    ("evaluate", ["--config=configs/stage2.py"], "--config is a training config (it has no 'task')"),
    ("evaluate", [], "--config is required: an evaluation config"),
]


def _run_mistakes() -> list[int]:
  """The indices of the MISTAKES cases that can happen here (the missing-libtpu one only where it is missing)."""
  return [i for i, (_, _, expected) in enumerate(MISTAKES) if not ("needs libtpu" in expected and _libtpu_installed())]


def _mistake_runs(folder):
  """One `python -m qwenvl_jax.<module> ARGS` per case of `_run_mistakes` (a process start each), each in a folder
  of its own: commands of a job registered in tests/background.py, run from the session's start on the core the
  other tests leave idle."""
  env = helpers.subprocess_env()
  commands = []
  for i in _run_mistakes():
    module, args, _ = MISTAKES[i]
    (folder / str(i)).mkdir()
    args = [a.replace("configs/", f"{REPO_ROOT / 'configs'}/") for a in args]
    commands.append(background.Command([sys.executable, "-m", f"qwenvl_jax.{module}", *args], env, folder / str(i),
                                       check=False))
  return commands


background.register(__name__, "mistake_runs", _mistake_runs)


@pytest.fixture(scope="module")
def mistake_runs(tmp_path_factory):
  """MISTAKES index -> the finished `python -m qwenvl_jax.<module> ARGS` of that case."""
  job = background.job(__name__, "mistake_runs", tmp_path_factory.mktemp)
  return dict(zip(_run_mistakes(), job.result()))


@pytest.mark.parametrize("module, args, expected", MISTAKES)
def test_entry_point_mistakes_that_were_tracebacks_are_one_line(mistake_runs, module, args, expected):
  if "needs libtpu" in expected and _libtpu_installed():
    pytest.skip("libtpu is installed: the missing-libtpu error cannot happen here")
  proc = mistake_runs[MISTAKES.index((module, args, expected))]
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert any(line.startswith("error: ") and expected in line for line in proc.stderr.splitlines()), proc.stderr


def test_ctrl_c_is_one_line_and_exit_130(capsys):
  def main(argv):
    del argv
    raise KeyboardInterrupt
  assert _run_main(main) == 130
  assert capsys.readouterr().err == "interrupted\n"


def _helps(folder):
  """`--help` of every entry point, one process each: commands of a job registered in tests/background.py."""
  del folder
  env = helpers.subprocess_env()
  commands = [["-m", f"qwenvl_jax.{name}", "--help"] for name in ENTRY_POINTS] + [["launch/tpu.py", "--help"]]
  return [background.Command([sys.executable, *args], env, REPO_ROOT, check=False) for args in commands]


helps = background.finished_work(__name__, "helps", _helps)


@pytest.mark.slow
def test_help_exits_0_for_every_entry_point(helps):
  _, (*procs, launch) = helps
  assert len(procs) == len(ENTRY_POINTS)
  for name, proc in zip(ENTRY_POINTS, procs):
    assert proc.returncode == 0, (name, proc.stderr[-2000:])
    assert "flags" in proc.stdout.lower(), name
  assert launch.returncode == 0, launch.stderr[-2000:]


def test_absl_flags_untouched():
  """cli.run is used by the entry points only; importing it defines no flags."""
  assert "config" not in flags.FLAGS or flags.FLAGS["config"].name == "config"


def test_quiet_libraries_hides_info_of_jax_orbax_and_absl():
  """generate's answer was buried under absl/orbax INFO lines and "Unable to initialize backend 'tpu'" (INFO)."""
  import logging  # pylint: disable=import-outside-toplevel
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  names = ("jax._src.xla_bridge", "orbax", "absl")
  before = {n: logging.getLogger(n).level for n in names}
  verbosity = absl_logging.get_verbosity()
  try:
    cli.quiet_libraries()
    for name in names:
      assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
      assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
  finally:
    for name, level in before.items():
      logging.getLogger(name).setLevel(level)
    absl_logging.set_verbosity(verbosity)
