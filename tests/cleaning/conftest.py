"""Fixtures of the cleaning tests: the generated input of `cases.py`, written once per session."""
import pathlib

import pytest

from tests.cleaning.cases import Case, write_inputs


@pytest.fixture(scope="session")
def clean_inputs(tmp_path_factory) -> tuple[pathlib.Path, list[Case]]:
  """(input folder, cases) shared by the pipeline tests."""
  tmp = tmp_path_factory.mktemp("clean_inputs")
  return tmp, write_inputs(tmp)
