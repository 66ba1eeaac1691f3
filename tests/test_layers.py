"""The package's layering (docs/DESIGN.md §0, contracts in pyproject.toml's [tool.importlinter]) holds, and the check
really fails when an upward import is added (on a copy of the package, so the checkout is never touched)."""
import os
import pathlib
import shutil
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _lint(root: pathlib.Path) -> subprocess.CompletedProcess:
  """`lint-imports` run in `root` against the `qwenvl_jax` found there (static analysis: nothing is imported)."""
  env = {**os.environ, "PYTHONPATH": str(root)}
  return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                         "sys.exit(lint_imports(no_cache=True, no_logo=True))"], cwd=root, env=env, capture_output=True, text=True,
                        timeout=300, check=False)


def test_layers_are_kept():
  proc = _lint(REPO_ROOT)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert "qwenvl_jax layers KEPT" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
  shutil.copytree(REPO_ROOT / "qwenvl_jax", tmp_path / "qwenvl_jax", ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
  scoring = tmp_path / "qwenvl_jax" / "inference" / "scoring.py"
  # The cycle this layering removed: inference taking its option losses from evaluation.
  scoring.write_text(scoring.read_text() + "\nfrom qwenvl_jax.evaluation import multiple_choice  # upward\n")
  proc = _lint(tmp_path)
  assert proc.returncode != 0
  assert "qwenvl_jax layers BROKEN" in proc.stdout
  assert "qwenvl_jax.inference.scoring -> qwenvl_jax.evaluation.multiple_choice" in proc.stdout
