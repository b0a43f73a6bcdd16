"""What a workdir holds: the run's config, checked before a rerun resumes it.

The first run in a workdir writes `config.json` (process 0): the whole config and its
identity, the sections that define the run — task, model, input, mask, seed and the MIM
target (`target`, `loss_on`). A later run in the same workdir resumes it; if its
identity differs, `check` refuses before anything is compiled or written, naming the
differing keys. `--overwrite` (main.py) moves the old run aside into `replaced-<time>/`
inside the workdir instead (nothing is deleted) and starts afresh. Settings that may
change on a resume (total_steps, logging, checkpoint interval, eval) are not part of the
identity. The workdir may be on a bucket (`gs://BUCKET/run`): its files go through
`beit_jax.paths`, and `check` first makes sure the bucket's package is installed. A run
that ended (trained, evaluated, exported) leaves `summary.json`; rerunning its command
then prints that summary and stops (`completed`; `beit_jax.main --reevaluate` evaluates
and exports it again).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from beit_jax import paths

RUN_CONFIG = "config.json"
SUMMARY = "summary.json"  # Written when a run ends with its export: step + summary lines.
IDENTITY = ("task", "model", "input", "mask", "seed", "target", "loss_on")


def _plain(value: Any) -> Any:
  """JSON round trip (tuples -> lists) so stored and live configs compare equal."""
  return json.loads(json.dumps(value, default=str))


def identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  out = {}
  for key in IDENTITY:
    if key in config:
      value = config[key]
      out[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return _plain(out)


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      name = f"{prefix}.{key}" if prefix else key
      if key not in old or key not in new:
        out.append(f"{name}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}")
      else:
        out.extend(_differences(old[key], new[key], name))
    return out
  return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def check(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False) -> None:
  """Refuses a workdir that holds a run of a different config (see the module doc), or
  one on a bucket whose package is missing (`paths.StorageBackendMissing`)."""
  paths.check_storage({"workdir": workdir})
  path = os.path.join(workdir, RUN_CONFIG)
  if not paths.exists(path):
    return
  stored = json.loads(paths.read_text(path)).get("identity", {})
  diffs = _differences(stored, identity(config))
  if not diffs:
    return
  if not overwrite:
    shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
    raise ValueError(
      f"{workdir} holds a run of a different config ({shown}). Rerun it with the config "
      "that started it to resume, choose a new --workdir, or pass --overwrite to move the "
      f"old run into {workdir}/replaced-<time>/ and start afresh."
    )
  if jax.process_index() == 0:
    aside = os.path.join(workdir, time.strftime("replaced-%Y%m%d-%H%M%S"))
    paths.makedirs(aside)
    for name in paths.listdir(workdir):
      if not name.startswith("replaced-"):
        paths.move(os.path.join(workdir, name), os.path.join(aside, name))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("beit_jax.workdir.overwrite")


def write(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `config.json` once, at the start of the first run in `workdir`."""
  path = os.path.join(workdir, RUN_CONFIG)
  if jax.process_index() != 0 or paths.exists(path):
    return
  record = {"identity": identity(config), "config": _plain(config.to_dict())}
  paths.write_text(path, json.dumps(record, indent=2, sort_keys=True))


def write_summary(workdir: str, step: int, lines: list[str]) -> None:
  """Records that the run in `workdir` ended at `step` (trained, evaluated, exported)."""
  if jax.process_index() == 0:
    record = {"step": int(step), "lines": list(lines)}
    paths.write_text(os.path.join(workdir, SUMMARY), json.dumps(record, indent=2))


def completed(workdir: str, total_steps: int) -> list[str] | None:
  """The summary lines of a run in `workdir` that ended at `total_steps` or later, else
  None (no run, a run stopped early, or one to be trained further)."""
  path = os.path.join(workdir, SUMMARY)
  if not paths.exists(path):
    return None
  record = json.loads(paths.read_text(path))
  return record["lines"] if record.get("step", -1) >= total_steps else None
