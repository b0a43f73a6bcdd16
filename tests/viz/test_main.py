"""`python -m beit_jax.viz`: what it says without an export (with one: the quick-start
test draws the pictures through the same code)."""

import pytest

from beit_jax.viz import __main__ as viz_cli


def test_cli_without_an_export_says_what_to_run(tmp_path):
  with pytest.raises(SystemExit, match="run the quick start first"):
    viz_cli.main([f"--workdir={tmp_path}"])


def test_cli_with_a_bucket_path_and_no_gcsfs_says_what_to_install(no_gcs_backend):
  with pytest.raises(SystemExit, match=r"--workdir='gs://b/run': gs:// paths need gcsfs"):
    viz_cli.main(["--workdir=gs://b/run"])
