"""The prepared GPU run (bench/gpu_checks.sh, bench/gpu_wheels.sh) cannot run here, and a mistake in it would cost
a GPU session's short device time: check here what can be checked without a GPU."""
import pathlib
import re
import shlex
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]
CHECKS = REPO / "bench" / "gpu_checks.sh"
WHEELS = REPO / "bench" / "gpu_wheels.sh"


def _normal(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
  """requirements.txt's `name==version` lines, names normalized."""
  pins = {}
  for line in (REPO / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if "==" in line:
      name, version = line.split("==")
      pins[_normal(name)] = version.strip()
  return pins


def test_both_scripts_parse_as_bash():
  for script in (CHECKS, WHEELS):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_the_carried_wheels_are_the_versions_requirements_pins():
  pins = _pins()
  text = WHEELS.read_text()
  listed = text.split("WHEELS=(")[1].split(")")[0]
  carried = {_normal(m.group(1)): m.group(2) for m in re.finditer(r"\b([A-Za-z][\w.\-]*)==([\w.]+)", listed)}
  assert len(carried) >= 25
  shared = set(carried) & set(pins)
  assert {"flax", "optax", "orbax-checkpoint", "qwix", "grain", "fastapi", "uvicorn", "ml-collections"} <= shared
  # flax is the one exception: the image's jax 0.11 needs flax >= 0.12.9, which needs jax >= 0.11.1 (Python >= 3.12),
  # while requirements.txt pins jax 0.10.2 for Python 3.11 and flax 0.12.8 with it.
  assert pins["flax"] == "0.12.8" and carried["flax"] == "0.12.12"
  assert {n: carried[n] for n in shared - {"flax"}} == {n: pins[n] for n in shared - {"flax"}}
  # jax and jaxlib come from the image (with its CUDA plugin); never carried.
  assert not {"jax", "jaxlib"} & set(carried)


def test_every_flag_the_checks_pass_is_one_the_bench_script_takes():
  text = CHECKS.read_text().replace("\\\n", " ")
  commands = [line.split("python3", 1)[1] for line in text.splitlines()
              if line.startswith("check ") and "python3 bench/" in line]
  assert len(commands) == 8
  for command in commands:
    words = shlex.split(command.replace("${DTYPE:+--dtype=$DTYPE}", "--dtype=x"))
    script = REPO / words[0]
    source = script.read_text()
    for word in words[1:]:
      flag = word.split("=")[0]
      assert flag.startswith("--"), (script.name, word)
      assert f'add_argument("{flag}"' in source, f"{script.name} takes no {flag}"


def test_the_checks_run_the_benches_that_default_to_the_cpu_on_the_gpu():
  """bench_serve, bench_score and bench_n_choices set JAX_PLATFORMS=cpu unless it is set (so that a CPU machine with
  libtpu installed does not try a TPU). The checks ran them without setting it: the serve and score figures would
  have come from the GPU machine's CPU. The script exports JAX_PLATFORMS=cuda before its first check, and only
  serve_cpu asks for the CPU."""
  text = CHECKS.read_text().replace("\\\n", " ")
  first_check = text.index("\ncheck ")
  assert "export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}" in text[:first_check]
  defaulting = {script.name for script in (REPO / "bench").glob("*.py")
                if 'os.environ.setdefault("JAX_PLATFORMS", "cpu")' in script.read_text()}
  checks = [line.split() for line in text.splitlines() if line.startswith("check ")]
  on_cpu = {words[1] for words in checks if "JAX_PLATFORMS=cpu" in words}
  run = {pathlib.Path(w).name for words in checks for w in words if w.startswith("bench/")}
  assert {"bench_serve.py", "bench_score.py", "bench_n_choices.py"} <= defaulting & run
  assert on_cpu == {"serve_cpu"}


def test_every_flag_in_a_bench_docstring_example_is_one_its_script_takes():
  """The commands bench scripts show in their docstrings are what a GPU session copies: a flag a script does not
  take (one said `--context`) fails there after the machine's start-up."""
  checked = 0
  for script in sorted((REPO / "bench").glob("*.py")):
    source = script.read_text()
    if "argparse" not in source:
      continue
    doc = source.split('"""')[1] if source.lstrip().startswith('"""') else ""
    for line in re.sub(r"\\+\n\s*", " ", doc).splitlines():  # continued lines (a backslash in the source) joined
      line = line.strip().split("  #")[0]
      match = re.search(rf"python3? bench/{re.escape(script.name)}(.*)", line)
      if not match:
        continue
      for word in shlex.split(match.group(1)):
        if word.startswith("--"):
          flag = word.split("=")[0]
          assert re.search(rf"add_argument\(\s*\"{re.escape(flag)}\"", source), f"{script.name}: {line!r} uses {flag}"
          checked += 1
  assert checked > 30


def test_the_gpu_requirements_pull_the_cuda_plugin_of_the_pinned_jax():
  """requirements-gpu.txt (README, "GPU hosts") adds only the CUDA extra of jax, at requirements.txt's version: a
  mismatch would make pip refuse the install, or replace the tested jax."""
  pins = _pins()
  lines = [line.strip() for line in (REPO / "requirements-gpu.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
  assert lines == ["-r requirements.txt", f"jax[cuda12]=={pins['jax']}"]
  assert pins["jaxlib"] == pins["jax"]


def test_bench_subprocesses_keep_the_callers_pythonpath():
  """On the GPU machine the carried packages are found through PYTHONPATH alone (gpu_checks.sh installs them with
  `--target`): a bench script that gives its subprocesses PYTHONPATH=<repo> only loses them (bench_quantized_decode
  did: its `quantized` check would have died with "No module named 'flax'")."""
  checked = 0
  for script in sorted((REPO / "bench").glob("*.py")):
    lines = script.read_text().splitlines()
    for number, line in enumerate(lines):
      code = line.split("#")[0]
      if re.search(r"PYTHONPATH=(?!/)|\[\"PYTHONPATH\"\]\s*=", code):  # an assignment, not a shell example
        nearby = code + " ".join(lines[number + 1:number + 2])
        assert 'get("PYTHONPATH"' in nearby, f"{script.name}:{number + 1} drops the caller's PYTHONPATH: {code}"
        checked += 1
  assert checked >= 4
