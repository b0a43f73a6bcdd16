"""What a person sees on the console, and `WORKDIR/log.txt` with everything else.

At verbosity 0 (the default of `beit_jax.main`) the console shows this package's messages
(progress lines, stage headers, the end-of-run summary) without absl's
`I1202 10:00:00.000 123 file.py:10]` prefix, and every library's warnings and errors;
the INFO messages of the libraries (Orbax, Grain, absl, JAX) go only to
`WORKDIR/log.txt`, which receives every record with absl's full prefix. `--verbosity=1`
(or more) keeps absl's console as it is: every INFO record, prefixed.

The log file opens when training starts (`open_log_file`, from `loop.run_job`, once every
check has passed): records from before are held in memory and written then, so a run
refused at its checks writes nothing into the workdir. The quick start's first stage logs
into `WORKDIR/tokenizer/log.txt`, its second into `WORKDIR/log.txt`.
"""

from __future__ import annotations

import logging as pylogging
import os

import jax
from absl import logging

from beit_jax import paths

LOG_FILE = "log.txt"
FILE_ONLY = "beit_jax_file_only"  # `extra={FILE_ONLY: True}`: a record for log.txt only.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_MAX_HELD = 10_000  # Records held before the log file opens (older ones are dropped).


def _ours(record: pylogging.LogRecord) -> bool:
  return record.pathname.startswith(_PACKAGE_DIR)


class _ConsoleFilter(pylogging.Filter):
  """Keeps this package's records and every library's warnings and errors."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    if getattr(record, FILE_ONLY, False):
      return False
    return record.levelno >= pylogging.WARNING or _ours(record)


class _PlainFormatter(pylogging.Formatter):
  """The message alone; warnings and errors say so ('warning: ...')."""

  def format(self, record: pylogging.LogRecord) -> str:
    message = record.getMessage()
    if record.levelno >= pylogging.ERROR:
      return f"error: {message}"
    if record.levelno >= pylogging.WARNING:
      return f"warning: {message}"
    return message


class _LogFile(pylogging.Handler):
  """Every record, with absl's prefix, into WORKDIR/log.txt once `open` is called."""

  def __init__(self):
    super().__init__(pylogging.DEBUG)
    self.setFormatter(logging.PythonFormatter())
    self._held: list[pylogging.LogRecord] = []
    self._file = None
    self._remote = False

  def open(self, path: str) -> None:
    if self._file is not None:
      self._file.close()
    self._file = paths.Appender(path)
    self._remote = paths.is_remote(path)
    for record in self._held:
      self._write(record)
    self._held = []

  def _write(self, record: pylogging.LogRecord) -> None:
    self._file.write(self.format(record) + "\n")
    if not self._remote or record.levelno >= pylogging.WARNING:
      self._file.flush()  # A bucket object is rewritten whole at each flush: fewer there.

  def emit(self, record: pylogging.LogRecord) -> None:
    try:
      if self._file is None:
        if len(self._held) < _MAX_HELD:
          self._held.append(record)
      else:
        self._write(record)
    except Exception:  # A logging failure must not stop the run.
      self.handleError(record)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    super().close()


_log_file: _LogFile | None = None


def setup(verbosity: int = 0) -> None:
  """Splits absl's output as the module doc says. Call it once absl's handler exists
  (inside `app.run`'s main) and before JAX starts its backend. It sets absl's verbosity
  (and so `FLAGS.verbosity`) to INFO: read the flag before."""
  global _log_file
  logging.set_verbosity(logging.INFO)  # Every INFO record reaches the log file.
  handler = logging.get_absl_handler()
  if verbosity <= 0:
    handler.setFormatter(_PlainFormatter())
    handler.addFilter(_ConsoleFilter())
  if _log_file is None:
    _log_file = _LogFile()
    pylogging.getLogger().addHandler(_log_file)


def quiet_other_processes(verbosity: int = 0) -> None:
  """Processes other than 0 print warnings and errors only (after JAX's distributed
  start-up, which decides the process index)."""
  if verbosity <= 0 and jax.process_index() != 0:
    logging.get_absl_handler().setLevel(pylogging.WARNING)


def open_log_file(workdir: str) -> str | None:
  """Starts writing `WORKDIR/log.txt` (process 0), with the records held so far."""
  if _log_file is None or jax.process_index() != 0:
    return None
  paths.makedirs(workdir)
  path = os.path.join(workdir, LOG_FILE)
  _log_file.open(path)
  return path
