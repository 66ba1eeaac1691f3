"""gcloud argv builders: accelerator names, node naming for multi-slice, create/delete variants."""
import pytest

import _gcloud


@pytest.mark.parametrize("name,expected", [
    ("v5p-128", "v5p-128"), ("v4-128", "v4-128"), ("v5e-16", "v5litepod-16"), ("v5litepod-16", "v5litepod-16"),
    ("V6E-64", "v6e-64"),
])
def test_accelerator_type(name, expected):
  assert _gcloud.accelerator_type(name) == expected


@pytest.mark.parametrize("name", ["v5p", "v7-8", "h100-8", "v5p-"])
def test_bad_accelerator_type(name):
  with pytest.raises(ValueError, match="--topology"):
    _gcloud.accelerator_type(name)


def test_multi_slice_is_queued_with_one_node_per_slice():
  s = _gcloud.Slice(name="run", zone="z", topology="v5p-128", num_slices=3)
  assert s.is_queued and s.nodes == ["run-0", "run-1", "run-2"]
  assert _gcloud.worker0_ip(s)[5] == "run-0"
  single = _gcloud.Slice(name="run", zone="z", topology="v5p-128")
  assert not single.is_queued and single.nodes == ["run"]
  assert _gcloud.wait_ready(single) == []


def test_project_flag_only_when_given():
  s = _gcloud.Slice(name="run", zone="z", project="p", topology="v6e-8")
  assert _gcloud.ssh(s, "run", "true")[6:9] == ["--zone=z", "--project=p", "--worker=all"]
  (cmd,) = _gcloud.create(s, runtime_version="custom")
  assert "--version=custom" in cmd and "--project=p" in cmd


@pytest.mark.parametrize("kw,match", [
    (dict(name="Run"), "--name"), (dict(zone=""), "--zone"), (dict(num_slices=0), "--num_slices"),
    (dict(topology="v5p"), "--topology"),
])
def test_slice_validation(kw, match):
  fields = dict(name="run", zone="z", topology="v5p-8")
  fields.update(kw)
  with pytest.raises(ValueError, match=match):
    _gcloud.Slice(**fields)
