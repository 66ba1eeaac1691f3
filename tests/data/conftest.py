"""Fixtures of the data tests."""
import pytest

from tests.data.helpers import ByteTokenizer


@pytest.fixture(scope="session")
def byte_tokenizer() -> ByteTokenizer:
  return ByteTokenizer()
