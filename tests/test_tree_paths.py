"""The one nested <-> flat path rule (checkpoint paths with ".", optimizer labels with "/")."""
import pytest

from qwenvl_jax import tree_paths

TREE = {"visual": {"conv1": {"kernel": 1}, "blocks": {"ln_1": {"scale": [2, 3]}}}, "proj": 4}


@pytest.mark.parametrize("sep", [".", "/"])
def test_round_trip(sep):
  flat = tree_paths.flatten(TREE, sep=sep)
  assert flat == {f"visual{sep}conv1{sep}kernel": 1, f"visual{sep}blocks{sep}ln_1{sep}scale": [2, 3], "proj": 4}
  assert tree_paths.unflatten(flat, sep=sep) == TREE


def test_lists_are_leaves_and_empty_mappings_vanish():
  assert tree_paths.flatten({"a": [], "b": {}, "c": {"d": (1, 2)}}) == {"a": [], "c.d": (1, 2)}
