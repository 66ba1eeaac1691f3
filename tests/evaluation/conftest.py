"""Fixtures of the evaluation tests: pycocoevalcap's Java PTB tokenizer, when Java and the jar are present."""
import os
import pathlib
import shutil
import subprocess

import pytest


@pytest.fixture
def java_ptb_tokenize(tmp_path):
  """pycocoevalcap's normalisation, run the way it does (the jar on a file of lines, then its PUNCTUATIONS
  filter) but with the file in the test's tmp folder instead of site-packages. Skips without Java."""
  ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
  if shutil.which("java") is None:
    pytest.skip("java is not installed: cannot run pycocoevalcap's PTBTokenizer jar")
  jar = pathlib.Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR

  def tokenize(texts):
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    proc = subprocess.run(
        ["java", "-cp", os.fspath(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
         "-lowerCase", os.fspath(source)], capture_output=True, check=True, timeout=120)
    lines = proc.stdout.decode("utf-8").split("\n")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS)
            for line in lines[:len(texts)]]

  return tokenize
