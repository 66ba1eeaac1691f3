"""A URL workdir (`gs://bucket/run`, what the TPU launcher requires) is used as given, never made a local path.

There is no GCS here, so `fake_gcs` points etils.epath's gs:// backend (fsspec's 'gcs' protocol) at an in-memory
fsspec filesystem that, like GCS, cannot append. The workdir functions then run end to end on `gs://` paths and
their results are read back through that filesystem. Orbax's own gs:// I/O (tensorstore) is not covered.
"""
import importlib
import json
import logging
import os

from etils import epath
from etils.epath import backend as epath_backend
import fsspec
from fsspec.implementations import memory
import pytest

from qwenvl_jax import errors
from qwenvl_jax.training import checkpointing, experiment, metrics, workdir
from tests.training.helpers import small_config


class _NoAppendMemoryFS(memory.MemoryFileSystem):
  """fsspec memory filesystem answering gs:// paths, refusing append like an object store."""
  protocol = ("gcs", "gs")
  root_marker = "/"
  cachable = False

  @classmethod
  def _strip_protocol(cls, path):
    path = fsspec.utils.stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return "/" + path.strip("/")

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError("object stores cannot append")
    return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch):
  """A fresh in-memory filesystem behind epath's gs:// (yields the fsspec filesystem)."""
  fs_cls = type("FakeGCS", (_NoAppendMemoryFS,), {"store": {}, "pseudo_dirs": [""]})
  # `fsspec.registry` is a read-only view; the module's dict is what `fsspec.filesystem` consults first.
  registry = importlib.import_module("fsspec.registry")
  monkeypatch.setitem(registry._registry, "gcs", fs_cls)  # pylint: disable=protected-access
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield fsspec.filesystem("gcs")
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


@pytest.fixture
def no_gcsfs(monkeypatch):
  """epath's gs:// backend as on a machine without gcsfs (fsspec's 'gcs' protocol cannot be imported)."""
  registry = importlib.import_module("fsspec.registry")
  monkeypatch.delitem(registry._registry, "gcs", raising=False)  # pylint: disable=protected-access
  monkeypatch.setitem(registry.known_implementations, "gcs",
                      {"class": "qwenvl_no_such_module.GCSFileSystem", "err": "Please install gcsfs to access "
                                                                              "Google Storage"})
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def test_a_url_workdir_without_gcsfs_is_one_line_naming_the_package(no_gcsfs):
  with pytest.raises(errors.UserError, match=r"^workdir gs://bucket/run: gs:// paths need the gcsfs package, which "
                                             r"is not installed \(pip install gcsfs\)$"):
    workdir.check_usable("gs://bucket/run")


def test_the_fake_is_what_epath_uses(fake_gcs):
  epath.Path("gs://b/probe.txt").write_text("x")
  assert fake_gcs.cat_file("gs://b/probe.txt") == b"x"
  with pytest.raises(NotImplementedError):
    epath.Path("gs://b/probe.txt").open("a")


@pytest.mark.parametrize("url", ["gs://b/x", "gs://bucket/runs/stage1", "s3://b/x"])
def test_resolve_keeps_urls(url):
  assert workdir.resolve(small_config(1, url)) == url
  assert workdir.is_remote(url)


def test_resolve_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert workdir.resolve(small_config(1, "rel/run")) == str(tmp_path / "rel" / "run")
  assert not workdir.is_remote("rel/run")


def test_create_touches_no_bucket(tmp_path, fake_gcs):
  workdir.create("gs://b/new_run")
  assert not fake_gcs.exists("gs://b/new_run")
  workdir.create(str(tmp_path / "a" / "b"))
  assert (tmp_path / "a" / "b").is_dir()


def test_config_record_and_refusal_on_a_url(fake_gcs):
  url = "gs://b/run"
  workdir.check_and_record(url, small_config(2, url), latest_step=None)
  assert json.loads(fake_gcs.cat_file(f"{url}/config.json"))["seq_len"] == 64
  workdir.check_and_record(url, small_config(2, url, total_steps=99), latest_step=4)
  changed = small_config(2, url, seq_len=32)
  with pytest.raises(FileExistsError, match=r"gs://b/run holds checkpoints .*\n  seq_len: 64 -> 32"):
    workdir.check_and_record(url, changed, latest_step=4)
  changed.resume = "force"
  assert workdir.check_and_record(url, changed, latest_step=4)
  workdir.record_resumed(url, changed, 4)
  assert json.loads(fake_gcs.cat_file(f"{url}/config.resumed_at_4.json"))["seq_len"] == 32


def test_metrics_are_rewritten_not_appended_and_survive_a_restart(fake_gcs, caplog):
  url = "gs://b/run"
  with caplog.at_level(logging.WARNING):
    writer = metrics.MetricsWriter(url, total_steps=10, initial_step=0, tensorboard=True, progress_bar=False)
  assert writer.path == f"{url}/metrics.jsonl"
  # Without google-cloud-storage tensorboardX cannot write gs://: TensorBoard is off, and says so.
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  if not record_writer.GCS_ENABLED:
    assert writer._tb is None  # pylint: disable=protected-access
    assert "TensorBoard disabled" in caplog.text
  writer.write(1, {"loss": 2.5, "mfu": None})
  writer.write(2, {"loss": float("nan")})
  writer.close()
  lines = fake_gcs.cat_file(f"{url}/metrics.jsonl").decode().splitlines()
  assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": "nan"}]

  resumed = metrics.MetricsWriter(url, total_steps=10, initial_step=2, tensorboard=False, progress_bar=False)
  resumed.write(3, {"loss": 1.0})
  resumed.flush()
  lines = fake_gcs.cat_file(f"{url}/metrics.jsonl").decode().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
  resumed.close()


def test_remote_metrics_are_throttled(fake_gcs, monkeypatch):
  url = "gs://b/run"
  writer = metrics.MetricsWriter(url, total_steps=10, initial_step=0, tensorboard=False, progress_bar=False)
  writer.write(1, {"loss": 1.0})
  assert not fake_gcs.exists(f"{url}/metrics.jsonl")  # within REMOTE_FLUSH_SECONDS of opening
  monkeypatch.setattr(metrics, "REMOTE_FLUSH_SECONDS", 0.0)
  writer.write(2, {"loss": 1.0})
  assert len(fake_gcs.cat_file(f"{url}/metrics.jsonl").decode().splitlines()) == 2
  writer.close()


def test_local_metrics_still_append(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  writer = metrics.MetricsWriter(str(tmp_path), total_steps=3, initial_step=1, tensorboard=False,
                                 progress_bar=False)
  writer.write(2, {"loss": 1.0})
  # Durable at once, without close().
  assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
  writer.close()


def test_synthetic_tokenizer_is_saved_to_and_reloaded_from_a_url(fake_gcs):
  url = "gs://b/run"
  config = small_config(1, url)
  first = experiment.make_tokenizer(config, url)
  stored = fake_gcs.cat_file(f"{url}/tokenizer.model")
  assert len(stored) > 0
  # A second run reuses the stored model instead of training a new one.
  fake_gcs.pipe_file(f"{url}/tokenizer.model", stored)
  second = experiment.make_tokenizer(config, url)
  assert second.vocab_size == first.vocab_size
  with open(second.path, "rb") as f:
    assert f.read() == stored


def test_trainer_init_spec_on_a_url(fake_gcs):
  for step in (10, 20):
    fake_gcs.pipe_file(f"gs://b/run/checkpoints/{step}/params/_METADATA", b"{}")
  fake_gcs.pipe_file("gs://b/run/checkpoints/30.orbax-checkpoint-tmp-1/params/_METADATA", b"{}")
  assert checkpointing.resolve_params_checkpoint("trainer:gs://b/run") == "gs://b/run/checkpoints/20/params"
  assert checkpointing.resolve_params_checkpoint("trainer:gs://b/run@10") == "gs://b/run/checkpoints/10/params"
  with pytest.raises(FileNotFoundError, match=r"no step 7 in gs://b/run/checkpoints"):
    checkpointing.resolve_params_checkpoint("trainer:gs://b/run@7")
  with pytest.raises(FileNotFoundError, match="no checkpoints under gs://b/other/checkpoints"):
    checkpointing.resolve_params_checkpoint("trainer:gs://b/other")
  assert checkpointing.resolve_params_checkpoint("params:gs://b/run/checkpoints/10/params") == \
      "gs://b/run/checkpoints/10/params"


def test_local_init_spec_is_still_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs("run/checkpoints/5/params")
  assert checkpointing.resolve_params_checkpoint("trainer:run") == str(tmp_path / "run" / "checkpoints" / "5" /
                                                                          "params")
