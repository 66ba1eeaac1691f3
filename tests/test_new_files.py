"""`new_files.open_new`: a new file, never over an existing one, and gone again when its write fails."""
import pytest

from qwenvl_jax import new_files


def test_a_write_that_fails_leaves_no_file_and_its_error(tmp_path):
  path = tmp_path / "history.json"
  with pytest.raises(KeyboardInterrupt):
    with new_files.open_new(path) as f:
      f.write("[[\"half")
      raise KeyboardInterrupt  # Ctrl-C, or a disk that filled up, halfway through
  assert not path.exists()
  with new_files.open_new(path, binary=True) as f:  # so the retry is not refused as existing
    f.write(b"[]")
  assert path.read_bytes() == b"[]"


def test_an_existing_file_is_refused_and_kept(tmp_path):
  path = tmp_path / "mine.png"
  path.write_bytes(b"the user's")
  with pytest.raises(FileExistsError):
    with new_files.open_new(path, binary=True) as f:
      f.write(b"ours")
  assert path.read_bytes() == b"the user's"


def test_replace_whole_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
  path = tmp_path / "row.json"
  new_files.replace_whole(path, '{"old": 1}')
  monkeypatch.setattr(new_files.os, "replace", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
  with pytest.raises(OSError, match="disk full"):
    new_files.replace_whole(path, '{"new": 2}')
  assert path.read_text() == '{"old": 1}' and sorted(p.name for p in tmp_path.iterdir()) == ["row.json"]


def test_a_new_folder_is_renamed_when_whole_and_removed_when_its_writing_fails(tmp_path):
  dst = tmp_path / "export"
  with pytest.raises(KeyboardInterrupt):
    with new_files.new_folder(dst) as folder:
      (folder / "half.bin").write_bytes(b"12")
      assert folder == tmp_path / "export.partial" and not dst.exists()
      raise KeyboardInterrupt
  assert not dst.exists() and not (tmp_path / "export.partial").exists()
  with new_files.new_folder(dst) as folder:
    (folder / "whole.bin").write_bytes(b"1234")
  assert [p.name for p in dst.iterdir()] == ["whole.bin"] and not (tmp_path / "export.partial").exists()
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    with new_files.new_folder(dst):
      pass
  (tmp_path / "other.partial").mkdir()  # what a killed writer leaves
  with pytest.raises(FileExistsError, match="the half-written output of an export that was killed"):
    with new_files.new_folder(tmp_path / "other"):
      pass


def test_a_url_is_refused_not_written_as_a_local_folder(tmp_path, monkeypatch):
  """pathlib reads gs://bucket/x as the local path gs:/bucket/x."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"output gs://bucket/x is a URL; this output is written as a local folder"):
    with new_files.new_folder("gs://bucket/x"):
      pass
  assert not (tmp_path / "gs:").exists()
