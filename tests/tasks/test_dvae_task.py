"""The tokenizer job end to end: CLI run, checkpoint, resume, export that reloads; config errors."""

import json
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax import exports
from beit_jax.models import dvae
from beit_jax.tasks import dvae as dvae_task

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "dvae_small.py")
TINY = [
  "--config.input.batch_size=8",
  "--config.eval_batch_size=8",
  "--config.model.hidden=16",
  "--config.model.codebook_dim=16",
  "--config.model.vocab_size=64",
  "--config.log_every=2",
  "--config.ckpt.every=2",
  "--config.ckpt.async_save=False",
  "--config.tensorboard=False",
  "--config.input.image_size=16",
  "--config.pictures=False",
]


def run_main(*args, devices=8):
  env = dict(
    os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu"
  )
  return subprocess.run(
    [sys.executable, "-m", "beit_jax.main", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def get_config(arg=None):
  sys.path.insert(0, os.path.dirname(CONFIG))
  try:
    import dvae_small

    return dvae_small.get_config(arg)
  finally:
    sys.path.pop(0)


def test_cli_train_checkpoint_resume_export(tmp_path):
  workdir = str(tmp_path / "run")
  first = run_main(f"--config={CONFIG}:steps=4", f"--workdir={workdir}", *TINY)
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [2, 4]
  for key in (
    "loss",
    "mse",
    "psnr",
    "kl",
    "perplexity",
    "usage",
    "tau",
    "beta",
    "lr",
    "grad_norm",
    "images_per_s",
  ):
    assert np.isfinite(train[-1][key]), key
  final = [r for r in records if r["split"] == "final_eval"]
  assert final and final[0]["num_images"] > 0 and "baseline_psnr" in final[0]
  assert np.isfinite(train[-1]["diversity_loss"])

  # The console: this package's lines without absl's prefix, one progress line per log
  # step, no library INFO (it is in log.txt, prefixed), the summary at the end.
  console = first.stderr.splitlines()
  assert not [line for line in console if re.match(r"[IWEF]\d{4} ", line)], console[:5]
  assert not [line for line in console if "orbax" in line.lower() or "grain" in line.lower()]
  progress = [line for line in console if line.startswith("step ")]
  assert len(progress) == 2 and progress[0].startswith("step 2/4  loss "), progress
  assert re.search(r"  usage \d+\.\d%  perplexity [\d.]+  tau [\d.]+  [\d,]+ img/s", progress[0])
  assert "ETA" in progress[0] and "ETA" not in progress[1]
  assert any(line.startswith("final eval  step 4/4  psnr ") for line in console)
  summary = console[console.index("Summary:") + 1 :]
  assert summary[0].startswith("  Trained: a compact dVAE tokenizer, 64 codes")
  assert "for each token's patch painted its mean colour" in summary[1]
  assert summary[2] == f"  Export: {workdir}/export/tokenizer"
  log = open(os.path.join(workdir, "log.txt")).read()
  assert re.search(r"^I\d{4} .*checkpoint_manager\.py", log, re.M)  # Orbax INFO, prefixed.
  assert "step 2/4  loss" in log and "Metadata file does not exist" not in log

  # The same command again: the run is complete; its summary, nothing re-run.
  again = run_main(f"--config={CONFIG}:steps=4", f"--workdir={workdir}", *TINY)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "This run is complete (4 steps" in again.stderr and summary[2] in again.stderr
  assert "--reevaluate" in again.stderr and "final eval" not in again.stderr
  assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == len(records)

  # Resume in the same workdir: continues from step 4 to 6, does not restart.
  second = run_main(f"--config={CONFIG}:steps=6", f"--workdir={workdir}", *TINY)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resumed from" in second.stderr and "at step 4" in second.stderr
  assert "Metadata file does not exist" not in second.stderr  # Orbax warned on resume.
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]

  # The export reloads and tokenizes.
  model, variables, meta = exports.load_tokenizer(os.path.join(workdir, "export", "tokenizer"))
  assert meta["step"] == 6 and meta["grid"] == 4 and meta["model"]["vocab_size"] == 64
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)), jnp.float32)
  ids = dvae.tokenize(model, variables, images)
  assert ids.shape == (2, 4, 4) and ids.dtype == jnp.int32
  assert int(ids.max()) < 64


def _one_error_line(result) -> str:
  """The run failed with status 2 and printed its error as one line, no traceback."""
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-2000:]
  return errors[0]


def test_cli_rejects_unknown_key_and_bad_value(tmp_path):
  bad_key = run_main(
    f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.model.hiden=3", devices=1
  )
  line = _one_error_line(bad_key)
  assert line.startswith("error: config.model.hiden is not a key of this config.")
  assert "Closest valid keys: model.hidden" in line
  no_key = run_main(f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.nosuchkey=1")
  assert "Keys of the config: ckpt, codebook, data," in _one_error_line(no_key)
  bad_type = run_main(f"--config={CONFIG}", f"--workdir={tmp_path}", "--config.total_steps=x")
  assert "--config.total_steps=x" in _one_error_line(bad_type)
  bad_value = run_main(
    f"--config={CONFIG}", f"--workdir={tmp_path}/w", "--config.data.source=imagenet", devices=1
  )
  assert "config.data.source='imagenet'" in _one_error_line(bad_value)
  missing = run_main(
    f"--config={CONFIG}",
    f"--workdir={tmp_path}/w",
    "--config.data.source=folder",
    f"--config.data.path={tmp_path}/no_images",
    devices=1,
  )
  assert "no_images" in _one_error_line(missing)
  assert not os.path.exists(f"{tmp_path}/w")  # Nothing written before the checks.
  # --verbosity=1 shows the traceback too.
  verbose = run_main(
    f"--config={CONFIG}", f"--workdir={tmp_path}/w", "--config.data.source=imagenet", "-v=1"
  )
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("model.arch", "vqgan", "model.arch"),
    ("input.image_size", 30, "divisible"),
    ("input.crop_scale", (0.5, 0.2), "crop_scale"),
    ("total_steps", 0, "total_steps"),
    ("ema_decay", 1.0, "ema_decay"),
    ("data.source", "folder", "data.path"),
  ],
)
def test_check_config(key, value, match):
  config = get_config()
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    dvae_task.check_config(config)


def test_configs_are_valid():
  dvae_task.check_config(get_config())
  dvae_task.check_config(get_config("image_size=64,vocab_size=8192,steps=10"))
  sys.path.insert(0, os.path.dirname(CONFIG))
  try:
    import dvae_dalle

    config = dvae_dalle.get_config()
  finally:
    sys.path.pop(0)
  dvae_task.check_config(config)
  assert config.model.arch == "dall_e" and config.input.image_size == 112
  assert config.loss.beta_end == 6.6 and config.loss.tau_end == 1 / 16
  assert config.optim.lr == 1e-4 and config.optim.min_lr == 1.25e-6


def test_dall_e_architecture_with_ema_in_process(tmp_path):
  """The DALL-E dVAE (tiny width) + logit-Laplace + EMA through the task on 8 devices."""
  config = get_config("image_size=16,vocab_size=32,steps=2")
  config.model.update(
    arch="dall_e",
    recon_loss="logit_laplace",
    input_norm="dall_e",
    n_hid=8,
    n_init=8,
    n_blk_per_group=1,
  )
  config.codebook.init = "random"  # k-means init is for the compact dVAE only.
  config.input.batch_size = 8
  config.eval_batch_size = 8
  config.ema_decay = 0.5
  config.log_every = 1
  config.tensorboard = False
  final = dvae_task.train_and_evaluate(config, str(tmp_path)).eval
  assert final["num_images"] > 0 and np.isfinite(final["psnr"])
  model, variables, meta = exports.load_tokenizer(str(tmp_path / "export" / "tokenizer"))
  assert meta["ema"] is True and meta["grid"] == 2 and model.downsample == 8
  assert set(variables["params"]) == {"encoder", "decoder"}
  assert "group_4" in variables["params"]["encoder"]["blocks"]
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
