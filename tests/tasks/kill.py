"""Killing a CLI run once it has written a checkpoint (the resume tests' first half)."""

import os
import signal
import subprocess
import time


def kill_after_first_checkpoint(proc: subprocess.Popen, ckpt_dir: str, timeout: float = 300) -> int:
  """SIGKILLs `proc` as soon as `ckpt_dir` holds a step folder; returns the newest step saved."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any(s.isdigit() for s in os.listdir(ckpt_dir)):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return max(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
