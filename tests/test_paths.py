"""beit_jax.paths: local and gs:// paths through one set of helpers, and the start-up check
that names the package a bucket needs (against the fake bucket of tests/fake_gcs.py)."""

import os
import sys

import ml_collections
import pytest

from beit_jax import paths


def test_names():
  assert paths.scheme("gs://b/x") == "gs" and paths.scheme("/data/x") is None
  assert paths.is_remote("s3://b/x") and not paths.is_remote("runs/x") and not paths.is_remote("")
  assert paths.absolute("gs://b/run") == "gs://b/run"  # os.path.abspath would mangle it.
  assert paths.absolute("runs/x") == os.path.join(os.getcwd(), "runs", "x")
  assert paths.expand("~/x") == os.path.expanduser("~/x") and paths.expand("gs://b/~") == "gs://b/~"


def test_remote_values_finds_every_uri_of_a_nested_config():
  config = ml_collections.ConfigDict(
    dict(
      data=dict(source="tfds", data_dir="gs://b/tfds", path=""),
      tokenizer=dict(path="", train=dict(data=dict(path="s3://b/images"))),
      pretrained="/local/export",
      tags=("x", "gs://b/extra"),
    )
  )
  assert paths.remote_values(config) == {
    "config.data.data_dir": "gs://b/tfds",
    "config.tokenizer.train.data.path": "s3://b/images",
    "config.tags[1]": "gs://b/extra",
  }


def test_missing_backend_is_one_line_naming_the_package(no_gcs_backend, monkeypatch):
  assert paths.missing_backend("/local/dir") is None
  with pytest.raises(paths.StorageBackendMissing) as e:
    paths.check_storage({"workdir": "runs/x", "config.tokenizer.path": "gs://b/dall_e"})
  message = str(e.value)
  assert message == (
    "config.tokenizer.path='gs://b/dall_e': gs:// paths need gcsfs, which is not installed: "
    'pip install "beit_jax[gcs]".'
  )
  monkeypatch.setitem(sys.modules, "s3fs", None)
  monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
  assert paths.missing_backend("s3://b/x").endswith(
    'need s3fs, which is not installed: pip install "beit_jax[s3]"'
  )
  assert "not supported" in paths.missing_backend("ftp://host/x")
  paths.check_storage({"a": "", "b": "/tmp", "c": 3})  # Nothing remote: passes.


def test_files_on_the_fake_bucket(fake_gcs):
  run = fake_gcs.url("run")
  assert not paths.exists(run) and not paths.isdir(run)
  paths.makedirs(run)  # Nothing to make on a bucket.
  paths.write_text(f"{run}/config.json", '{"a": 1}')
  paths.write_bytes(f"{run}/sub/deeper/x.bin", b"\0\1")
  paths.write_text(f"{run}/.hidden/y.txt", "hidden")
  paths.write_text(f"{run}/sub/.z.txt", "hidden")
  assert fake_gcs.keys() == [
    "run/.hidden/y.txt",
    "run/config.json",
    "run/sub/.z.txt",
    "run/sub/deeper/x.bin",
  ]
  assert paths.read_text(f"{run}/config.json") == '{"a": 1}'
  assert paths.read_bytes(f"{run}/sub/deeper/x.bin") == b"\0\1"
  assert paths.isdir(run) and paths.isfile(f"{run}/config.json")
  assert paths.listdir(run) == [".hidden", "config.json", "sub"]
  assert paths.list_files(run + "/") == [f"{run}/config.json", f"{run}/sub/deeper/x.bin"]
  paths.move(f"{run}/sub", f"{run}/moved")
  assert "run/moved/deeper/x.bin" in fake_gcs.keys() and not paths.exists(f"{run}/sub")
  assert list(paths.lines(f"{run}/config.json")) == ['{"a": 1}']
  assert not os.path.exists("gs:")  # Nothing went to a local folder named after the URI.


def test_list_files_locally(tmp_path):
  (tmp_path / "a" / ".git").mkdir(parents=True)
  (tmp_path / "a" / ".git" / "x").write_text("")
  (tmp_path / "a" / "b.txt").write_text("")
  (tmp_path / ".c").write_text("")
  (tmp_path / "d.txt").write_text("")
  assert paths.list_files(tmp_path) == [f"{tmp_path}/a/b.txt", f"{tmp_path}/d.txt"]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_appender_keeps_earlier_lines_and_shows_each_flush(where, tmp_path, fake_gcs):
  target = fake_gcs.url("run/m.jsonl") if where == "bucket" else str(tmp_path / "run" / "m.jsonl")
  with paths.Appender(target) as out:
    out.write("1\n")
    out.flush()
    assert paths.read_text(target) == "1\n"  # Visible before close (a crash keeps it).
    out.write("2\n")
  with paths.Appender(target) as out:  # A resumed run.
    out.write("3\n")
  assert paths.read_text(target) == "1\n2\n3\n"


def test_appending_to_a_bucket_object_is_refused_by_the_fake(fake_gcs):
  """What the Appender avoids: gcsfs turns 'a' into 'w' (earlier lines lost)."""
  with pytest.raises(NotImplementedError):
    paths.open_file(fake_gcs.url("m.jsonl"), "a")


def test_the_real_gcsfs_against_the_fake_server(real_gcsfs):
  """The `gcs` extra itself (gcsfs), speaking the JSON API to the fake server."""
  run = real_gcsfs.url("run")
  assert paths.missing_backend(run) is None
  paths.write_text(f"{run}/config.json", "{}")
  paths.write_bytes(f"{run}/train/cat/1.png", b"png")
  with paths.Appender(f"{run}/metrics.jsonl") as out:
    out.write("1\n")
    out.flush()
    out.write("2\n")
  assert real_gcsfs.keys() == ["run/config.json", "run/metrics.jsonl", "run/train/cat/1.png"]
  assert paths.read_text(f"{run}/metrics.jsonl") == "1\n2\n"
  assert paths.listdir(run) == ["config.json", "metrics.jsonl", "train"]
  assert paths.isdir(f"{run}/train") and not paths.exists(f"{run}/nothing")
  assert paths.list_files(f"{run}/train") == [f"{run}/train/cat/1.png"]
  paths.move(f"{run}/train", f"{run}/aside")
  assert "run/aside/cat/1.png" in real_gcsfs.keys() and not paths.exists(f"{run}/train")
  assert not real_gcsfs.server.errors
