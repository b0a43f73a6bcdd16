"""launch/beit_jax_quickstart.ipynb runs top to bottom (its code cells, shell lines
skipped), with a tiny quick start."""

import json
import os
import time

from tests.tasks.test_pretrain_task import ROOT

NOTEBOOK = os.path.join(ROOT, "launch", "beit_jax_quickstart.ipynb")
# The quick start shrunk like tests/tasks/test_pretrain_task.py's TINY.
OVERRIDES = {
  "input.batch_size": 8,
  "eval_batch_size": 8,
  "input.image_size": 32,
  "input.second_size": 16,
  "model.variant": "test",
  "log_every": 2,
  "ckpt.async_save": False,
  "tensorboard": False,
  "tokenizer.train.input.batch_size": 8,
  "tokenizer.train.input.image_size": 16,
  "tokenizer.train.eval_batch_size": 8,
  "tokenizer.train.model.hidden": 16,
  "tokenizer.train.model.codebook_dim": 16,
  "tokenizer.train.model.vocab_size": 64,
  "tokenizer.train.log_every": 2,
  "tokenizer.train.ckpt.async_save": False,
  "tokenizer.train.tensorboard": False,
  "tokenizer.train.pictures": False,  # The MIM stage's pictures are the ones shown.
}


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch, capsys):
  nb = json.load(open(NOTEBOOK))
  assert nb["nbformat"] == 4
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  assert len(cells) >= 4
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("BEIT_NOTEBOOK_STEPS", "4")
  monkeypatch.setenv("BEIT_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  scope = {"OVERRIDES": dict(OVERRIDES), "__name__": "__main__"}
  t0 = time.time()
  for i, cell in enumerate(cells):
    lines = cell.splitlines()
    source = "\n".join(line for line in lines if not line.lstrip().startswith(("!", "%")))
    exec(compile(source, f"{NOTEBOOK} cell {i}", "exec"), scope)
  out = capsys.readouterr().out
  assert "inpainting.png" in out and "features (1, " in out and "patches masked" in out
  assert scope["features"].shape == (1, scope["model"].embed_dim)
  print(f"notebook ran in {time.time() - t0:.0f} s")
