"""Paths that are local or on a bucket (`gs://BUCKET/...`, `s3://...`), handled in one place.

Every file the package reads or writes by name goes through here (the workdir's json
files and metrics, exports' `metadata.json`, image folders, pictures, PyTorch weights to
convert), so a `gs://` path works wherever a local one does. Files are opened, listed and
made with `etils.epath`; without TensorFlow, epath reaches a bucket through fsspec, which
needs the bucket's package: gcsfs for gs:// (`pip install "beit_jax[gcs]"`), s3fs for
s3:// (`beit_jax[s3]`). `check_storage` is the start-up check of the paths a run names:
one line naming the package to install, before anything is compiled or written.

Not through here, each with its own client for gs://: array data (Orbax checkpoints and
exports' `params/`: tensorstore's gcs driver), TFDS ArrayRecord files (array_record's C++
GCS reader; TFDS reads the dataset's metadata through epath) and TensorBoard events
(tensorboardX's gs:// writer, google-cloud-storage, which gcsfs installs).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Mapping
from typing import IO, Any

import fsspec
from etils import epath
from etils.epath import backend as epath_backend

PathLike = str | os.PathLike

# URI scheme -> (fsspec protocol, package that provides it, beit_jax extra that installs it).
BACKENDS = {
  "gs": ("gcs", "gcsfs", "gcs"),
  "s3": ("s3", "s3fs", "s3"),
}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageBackendMissing(ImportError):
  """A path on a bucket whose fsspec backend package is not installed."""


def scheme(path: PathLike) -> str | None:
  """'gs' for 'gs://b/x'; None for a local path."""
  m = _SCHEME.match(os.fspath(path)) if path else None
  return m.group(1).lower() if m else None


def is_remote(path: PathLike) -> bool:
  return scheme(path) is not None


def missing_backend(path: PathLike) -> str | None:
  """Why `path` cannot be opened here (one line), or None when it can."""
  kind = scheme(path)
  if kind is None:
    return None
  if kind not in BACKENDS:
    known = ", ".join(f"{k}://" for k in BACKENDS)
    return f"{kind}:// paths are not supported (local paths, {known})"
  protocol, package, extra = BACKENDS[kind]
  try:
    fsspec.get_filesystem_class(protocol)
  except ImportError:
    return (
      f'{kind}:// paths need {package}, which is not installed: pip install "beit_jax[{extra}]"'
    )
  return None


def check_storage(named: Mapping[str, Any]) -> None:
  """Raises StorageBackendMissing for the first of `named` ({what: path}) on a bucket
  whose backend is not installed; local and empty paths pass."""
  for what, value in named.items():
    if isinstance(value, (str, os.PathLike)) and (why := missing_backend(value)):
      raise StorageBackendMissing(f"{what}={os.fspath(value)!r}: {why}.")


def remote_values(tree: Any, prefix: str = "config") -> dict[str, str]:
  """{'config.a.b': value} for every string of a (nested) config that is a URI."""
  out: dict[str, str] = {}
  if isinstance(tree, Mapping) or hasattr(tree, "items"):
    for key, value in tree.items():
      out.update(remote_values(value, f"{prefix}.{key}"))
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      out.update(remote_values(value, f"{prefix}[{i}]"))
  elif isinstance(tree, str) and is_remote(tree):
    out[prefix] = tree
  return out


# ----------------------------------------------------------------------------------
# Names.
# ----------------------------------------------------------------------------------
def path(p: PathLike) -> epath.Path:
  return epath.Path(os.fspath(p))


def absolute(p: PathLike) -> str:
  """A URI as it is; a local path made absolute (`~` expanded)."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.abspath(os.path.expanduser(p))


def expand(p: PathLike) -> str:
  """`~` expanded in a local path; a URI as it is."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.expanduser(p)


def basename(p: PathLike) -> str:
  return os.path.basename(os.fspath(p).rstrip("/"))


# ----------------------------------------------------------------------------------
# Files and folders.
# ----------------------------------------------------------------------------------
def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def isfile(p: PathLike) -> bool:
  return path(p).is_file()


def listdir(p: PathLike) -> list[str]:
  """The names in folder `p`, sorted."""
  return sorted(c.name for c in path(p).iterdir())


def makedirs(p: PathLike) -> None:
  """Makes folder `p` and its parents; nothing to make on a bucket (no folders there)."""
  if not is_remote(p):
    path(p).mkdir(parents=True, exist_ok=True)


def open_file(p: PathLike, mode: str = "r") -> IO[Any]:
  """`open` for local and bucket paths ('r', 'w', 'rb', 'wb'; not 'a': see `Appender`)."""
  return path(p).open(mode)


def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


def read_text(p: PathLike) -> str:
  return path(p).read_text()


def write_text(p: PathLike, text: str) -> None:
  """Writes the whole file (its folder is made first)."""
  makedirs(os.path.dirname(absolute(p)))
  path(p).write_text(text)


def write_bytes(p: PathLike, data: bytes) -> None:
  makedirs(os.path.dirname(absolute(p)))
  path(p).write_bytes(data)


def move(src: PathLike, dst: PathLike) -> None:
  """Moves a file or folder within one filesystem (on a bucket: object by object, with
  fsspec: epath's rename wants the target's folder to exist, which a bucket has not)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if scheme(src) != scheme(dst):
    raise ValueError(f"Cannot move {src} to {dst}: not on the same filesystem.")
  if is_remote(src):
    fs = _filesystem(src)
    fs.mv(fs._strip_protocol(src), fs._strip_protocol(dst), recursive=True)
    fs.invalidate_cache()
  else:
    shutil.move(src, dst)


def _filesystem(p: str) -> fsspec.AbstractFileSystem:
  """The fsspec filesystem epath uses for bucket path `p` (one instance, one listing cache,
  so what is moved here is seen moved through epath)."""
  return epath_backend.fsspec_backend.fs(p)


def _hidden(relative: str) -> bool:
  return any(part.startswith(".") for part in relative.split("/"))


def list_files(root: PathLike) -> list[str]:
  """Every non-hidden file below folder `root`, recursively (hidden folders skipped),
  sorted, each named `root/relative/name` (`root` without its trailing '/').

  On a bucket this is one listing of the prefix (fsspec `find`), not a request per
  folder: ImageNet's 1.28M files are ~1,300 listing pages."""
  root = os.fspath(root)
  root = root.rstrip("/") or root
  if is_remote(root):
    fs = _filesystem(root)
    stripped = fs._strip_protocol(root)
    relative = [name[len(stripped) :].lstrip("/") for name in fs.find(stripped)]
  else:
    relative = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
      dirnames[:] = [d for d in dirnames if not d.startswith(".")]
      rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
      relative.extend(f if rel == "." else f"{rel}/{f}" for f in filenames)
  return sorted(f"{root}/{r}" for r in relative if r and not _hidden(r))


# ----------------------------------------------------------------------------------
# Appending (metrics.jsonl).
# ----------------------------------------------------------------------------------
class Appender:
  """A text file written by appending lines, local or on a bucket.

  Locally the file is opened in append mode. A bucket object cannot be appended to
  (gcsfs silently turns 'a' into 'w', and nothing is visible before close), so there the
  file's text is read once (a resumed run keeps its earlier lines) and the whole object
  is rewritten at every `flush`: a few MB at most for a run's metrics."""

  def __init__(self, p: PathLike):
    self.path = os.fspath(p)
    self._remote = is_remote(self.path)
    if self._remote:
      self._text = [read_text(self.path)] if exists(self.path) else []
      self._dirty = False
      self._file = None
    else:
      makedirs(os.path.dirname(absolute(self.path)))
      self._file = open(self.path, "a", encoding="utf-8")

  def write(self, text: str) -> None:
    if self._remote:
      self._text.append(text)
      self._dirty = True
    else:
      self._file.write(text)

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()
    elif self._dirty:
      write_text(self.path, "".join(self._text))
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()

  def __enter__(self) -> Appender:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def lines(p: PathLike) -> Iterator[str]:
  """The lines of a text file, local or on a bucket."""
  with open_file(p, "r") as f:
    yield from f
