"""The one `:key=value` parser of config files: typed values, clear errors, no silent False for a bad boolean."""
import pytest

from qwenvl_jax import config_args

DEFAULTS = {"model": "tiny", "res": None, "fix_vit": True, "lr": 0.1, "steps": 3}


def test_values_take_the_type_of_their_default():
  got = config_args.parse_arg("model=mid, res=448,fix_vit=No,lr=2e-5,steps=7", DEFAULTS)
  assert got == {"model": "mid", "res": 448, "fix_vit": False, "lr": 2e-5, "steps": 7}
  assert config_args.parse_arg("", DEFAULTS) == {} and config_args.parse_arg(None, DEFAULTS) == {}


@pytest.mark.parametrize("arg,message", [
    ("fix_vit=maybe", "fix_vit='maybe' is not a boolean"),
    ("res=big", "res='big' is not an integer"),
    ("lr=fast", "lr='fast' is not a float"),
    ("colour=red", r"unknown config arg keys \['colour'\]; known: fix_vit, lr, model, res, steps"),
    ("model", "'model' is not key=value"),
])
def test_bad_items_are_errors_naming_the_key(arg, message):
  with pytest.raises(ValueError, match=message):
    config_args.parse_arg(arg, DEFAULTS)
