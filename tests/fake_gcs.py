"""A fake Google Cloud Storage bucket over a local folder, for the gs:// tests.

Object `gs://BUCKET/KEY` is the file `ROOT/BUCKET/KEY`, reached two ways, as on a pod:

* `LocalBucketFS`, an fsspec filesystem registered for the `gs` / `gcs` protocols in place
  of gcsfs: what `etils.epath` (and so `beit_jax.paths`, TFDS and Orbax's file handling)
  uses for gs:// when TensorFlow is not installed. Writes need no folders (as on GCS).
* `FakeGcsServer`, the subset of the GCS JSON API that tensorstore (Orbax's array data),
  array_record's C++ reader (TFDS ArrayRecord files) and google-cloud-storage
  (tensorboardX's gs:// writer) speak: objects read whole or by range, simple, multipart
  and resumable uploads, deletes, listings by prefix, generation preconditions. Each
  library is pointed at it through its own variable (`TENSORSTORE_GCS_HTTP_URL`,
  `CLOUD_STORAGE_EMULATOR_ENDPOINT`, `STORAGE_EMULATOR_HOST`).

`fake_gcs` (a pytest fixture, imported by tests/conftest.py) sets up both for one test and
yields the `FakeBucket`. Nothing leaves the machine.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.parser
import email.policy
import http.server
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.parse
import uuid

import fsspec  # noqa: F401  (fsspec.registry below)
import pytest
from etils.epath import backend as epath_backend
from fsspec.spec import AbstractFileSystem
from fsspec.utils import stringify_path

BUCKET = "fake-bucket"  # tensorstore refuses bucket names shorter than 3 characters.


# ----------------------------------------------------------------------------------
# fsspec: what epath uses for gs:// without TensorFlow.
# ----------------------------------------------------------------------------------
class LocalBucketFS(AbstractFileSystem):
  """gs://BUCKET/KEY <-> ROOT/BUCKET/KEY, with gcsfs's names ('BUCKET/KEY') and an object
  store's folders: none are made, a folder exists while files are below it, and files
  cannot be appended to. `root` is set on a subclass per test."""

  protocol = ("gs", "gcs")
  root_marker = ""
  root = ""

  @classmethod
  def _strip_protocol(cls, path):
    path = stringify_path(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix) :]
    return path.rstrip("/")

  def _local(self, path) -> str:
    return os.path.join(self.root, *self._strip_protocol(path).split("/"))

  def info(self, path, **kwargs):
    name, local = self._strip_protocol(path), self._local(path)
    if os.path.isfile(local):
      st = os.stat(local)
      return {"name": name, "size": st.st_size, "type": "file", "mtime": st.st_mtime}
    if os.path.isdir(local) and ("/" not in name or any(f for _, _, f in os.walk(local))):
      return {"name": name, "size": 0, "type": "directory"}
    raise FileNotFoundError(path)

  def ls(self, path, detail=True, **kwargs):
    name, local = self._strip_protocol(path), self._local(path)
    if os.path.isfile(local):
      entries = [self.info(name)]
    else:
      entries = []
      for child in sorted(os.listdir(local)) if os.path.isdir(local) else ():
        try:
          entries.append(self.info(f"{name}/{child}"))
        except FileNotFoundError:
          pass  # An empty folder: nothing on GCS.
      if not entries and "/" in name:
        raise FileNotFoundError(path)
    return entries if detail else [e["name"] for e in entries]

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:  # gcsfs turns 'a' into 'w' (GCS cannot append): refuse it here.
      raise NotImplementedError("GCS objects cannot be appended to.")
    local = self._local(path)
    if "w" in mode or "x" in mode:
      os.makedirs(os.path.dirname(local), exist_ok=True)
    return open(local, mode)

  def cp_file(self, path1, path2, **kwargs):
    if os.path.isdir(self._local(path1)):
      return  # A "folder": its files are copied one by one.
    local = self._local(path2)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    shutil.copyfile(self._local(path1), local)

  def rm_file(self, path):
    local = self._local(path)
    if os.path.isdir(local):
      shutil.rmtree(local)
    elif os.path.exists(local):
      os.remove(local)

  _rm = rm_file

  def makedirs(self, path, exist_ok=False):
    """No folders on GCS (gcsfs makes buckets only)."""

  def mkdir(self, path, create_parents=True, **kwargs):
    """As `makedirs`."""


# ----------------------------------------------------------------------------------
# HTTP: the GCS JSON API of tensorstore, array_record and google-cloud-storage.
# ----------------------------------------------------------------------------------
def _rfc3339(seconds: float) -> str:
  when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
  return when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  disable_nagle_algorithm = True  # Headers and body go in two writes.
  server: FakeGcsServer

  def log_message(self, *args):
    pass

  # --- plumbing -----------------------------------------------------------------
  def _reply(self, status, body=b"", headers=None, content_type="application/json"):
    if isinstance(body, (dict, list)):
      body = json.dumps(body).encode()
    self.send_response(status)
    for k, v in (headers or {}).items():
      self.send_header(k, str(v))
    if body or status not in (204, 304):
      self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _error(self, status, message):
    self._reply(status, {"error": {"code": status, "message": message, "errors": []}})

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      out = b""
      while True:
        size = int(self.rfile.readline().strip() or b"0", 16)
        if not size:
          self.rfile.readline()
          return out
        out += self.rfile.read(size)
        self.rfile.readline()
    n = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(n) if n else b""

  def _route(self):
    url = urllib.parse.urlsplit(self.path)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
    parts = [urllib.parse.unquote(p) for p in url.path.split("/")]
    # parts: '', ['download' | 'upload'], 'storage', 'v1', 'b', BUCKET, ['o', [OBJECT]]
    prefix = parts[1] if len(parts) > 1 and parts[1] in ("download", "upload") else ""
    rest = parts[2:] if prefix else parts[1:]
    if rest[:3] != ["storage", "v1", "b"] or len(rest) < 4:
      return self._error(404, f"unknown path {url.path}")
    bucket, rest = rest[3], rest[4:]
    self.server.requests.append(
      (self.command, prefix, bucket, "/".join(rest[1:]), query, time.time())
    )
    if not rest:
      return self._reply(200, {"kind": "storage#bucket", "name": bucket, "id": bucket})
    if rest[0] != "o":
      return self._error(404, f"unknown path {url.path}")
    if len(rest) > 3 and rest[2] in ("rewriteTo", "copyTo", "moveTo"):
      self._body()
      return self._copy(bucket, rest[1], rest[-1], query, move=rest[2] == "moveTo")
    name = "/".join(rest[1:])
    if self.command in ("POST", "PUT") and prefix == "upload" and "upload_id" in query:
      return self._resumable_chunk(bucket, query, self._body())
    if self.command == "POST" and prefix == "upload":
      return self._upload(bucket, query, self._body())
    if self.command in ("GET", "HEAD") and not name:
      return self._list(bucket, query)
    if self.command in ("GET", "HEAD"):
      return self._get(bucket, name, query, media=prefix == "download" or "alt" in query)
    if self.command == "DELETE":
      return self._delete(bucket, name, query)
    self._body()
    return self._error(405, f"{self.command} {url.path} is not faked")

  def _handle(self):
    try:
      self._route()
    except (BrokenPipeError, ConnectionResetError):
      pass  # The client gave up on the answer (gcsfs races two requests for `info`).
    except Exception as e:  # Kept for the test to show; the client sees a 500.
      self.server.errors.append(f"{self.command} {self.path}: {type(e).__name__}: {e}")
      self._error(500, str(e))

  do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

  # --- objects --------------------------------------------------------------------
  def _meta(self, bucket, name):
    path = self.server.file(bucket, name)
    st = os.stat(path)
    gen = self.server.generation(path)
    return {
      "kind": "storage#object",
      "id": f"{bucket}/{name}/{gen}",
      "name": name,
      "bucket": bucket,
      "generation": str(gen),
      "metageneration": "1",
      "size": str(st.st_size),
      "contentType": "application/octet-stream",
      "storageClass": "STANDARD",
      "timeCreated": _rfc3339(st.st_mtime),
      "updated": _rfc3339(st.st_mtime),
      "selfLink": f"{self.server.url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, '')}",
      "mediaLink": f"{self.server.url}/download/storage/v1/b/{bucket}/o/"
      f"{urllib.parse.quote(name, '')}?alt=media",
    }

  def _precondition(self, bucket, name, query):
    """None if the generation preconditions hold, else the HTTP status to answer."""
    path = self.server.file(bucket, name)
    gen = self.server.generation(path) if os.path.isfile(path) else 0
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != gen:
      return 412
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == gen:
      return 304
    return None

  def _get(self, bucket, name, query, media):
    path = self.server.file(bucket, name)
    if not os.path.isfile(path):
      return self._error(404, f"No such object: {bucket}/{name}")
    status = self._precondition(bucket, name, query)
    if status:
      return self._reply(status, {} if status == 412 else b"")
    meta = self._meta(bucket, name)
    if not media:
      return self._reply(200, meta)
    with open(path, "rb") as f:
      data = f.read()
    headers = {
      "x-goog-generation": meta["generation"],
      "x-goog-metageneration": "1",
      "x-goog-stored-content-length": len(data),
      "x-goog-stored-content-encoding": "identity",
      "Accept-Ranges": "bytes",
      "Last-Modified": meta["updated"],
    }
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
    if m is None:
      return self._reply(200, data, headers, "application/octet-stream")
    size = len(data)
    if m.group(1):
      start = int(m.group(1))
      end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
    else:
      start, end = max(size - int(m.group(2)), 0), size - 1
    if start >= size and size:
      return self._reply(416, b"", {"Content-Range": f"bytes */{size}"})
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return self._reply(206, data[start : end + 1], headers, "application/octet-stream")

  def _delete(self, bucket, name, query):
    path = self.server.file(bucket, name)
    if not os.path.isfile(path):
      return self._error(404, f"No such object: {bucket}/{name}")
    if self._precondition(bucket, name, query):
      return self._error(412, "precondition failed")
    os.remove(path)
    return self._reply(204)

  def _store(self, bucket, name, data, query):
    if self._precondition(bucket, name, query):
      return self._error(412, "precondition failed")
    self.server.write(bucket, name, data)
    return self._reply(200, self._meta(bucket, name))

  def _copy(self, bucket, name, target, query, move):
    path = self.server.file(bucket, name)
    if not os.path.isfile(path):
      return self._error(404, f"No such object: {bucket}/{name}")
    if self._precondition(bucket, target, query):
      return self._error(412, "precondition failed")
    with open(path, "rb") as f:
      self.server.write(bucket, target, f.read())
    if move:
      os.remove(path)
      return self._reply(200, self._meta(bucket, target))
    meta = self._meta(bucket, target)
    size = meta["size"]
    return self._reply(
      200,
      dict(
        kind="storage#rewriteResponse",
        done=True,
        resource=meta,
        objectSize=size,
        totalBytesRewritten=size,
      ),
    )

  def _upload(self, bucket, query, body):
    kind = query.get("uploadType", "media")
    if kind == "media":
      return self._store(bucket, query["name"], body, query)
    if kind == "multipart":
      raw = b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body
      message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
      meta_part, data_part = list(message.iter_parts())[:2]
      meta = json.loads(meta_part.get_payload(decode=True) or b"{}")
      data = data_part.get_payload(decode=True) or b""
      return self._store(bucket, meta.get("name") or query["name"], data, query)
    if kind == "resumable":
      meta = json.loads(body or b"{}")
      upload_id = uuid.uuid4().hex
      self.server.uploads[upload_id] = (meta.get("name") or query["name"], query, bytearray())
      location = f"{self.server.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable"
      return self._reply(200, b"", {"Location": f"{location}&upload_id={upload_id}"})
    return self._error(400, f"uploadType={kind} is not faked")

  def _resumable_chunk(self, bucket, query, body):
    name, first_query, data = self.server.uploads[query["upload_id"]]
    data.extend(body)
    m = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+|\*)", self.headers.get("Content-Range", ""))
    total = m.group(1) if m else str(len(data))
    if total != "*" and len(data) >= int(total):
      del self.server.uploads[query["upload_id"]]
      return self._store(bucket, name, bytes(data), first_query)
    return self._reply(308, b"", {"Range": f"bytes=0-{len(data) - 1}"} if data else {})

  def _list(self, bucket, query):
    prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
    start, end = query.get("startOffset", ""), query.get("endOffset", "")
    items, prefixes = [], set()
    for name in self.server.names(bucket):
      if not name.startswith(prefix) or name < start or (end and name >= end):
        continue
      cut = name.find(delimiter, len(prefix)) if delimiter else -1
      if cut >= 0:
        prefixes.add(name[: cut + len(delimiter)])
      else:
        items.append(self._meta(bucket, name))
    out = {"kind": "storage#objects", "items": items}
    if prefixes:
      out["prefixes"] = sorted(prefixes)
    return self._reply(200, out)


class FakeGcsServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, root: str):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.root = root
    self.url = f"http://127.0.0.1:{self.server_port}"
    self.uploads: dict[str, tuple] = {}
    self.requests: list[tuple] = []
    self.errors: list[str] = []
    self._lock = threading.Lock()
    self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
    self._thread.start()

  def file(self, bucket: str, name: str) -> str:
    return os.path.join(self.root, bucket, *name.split("/"))

  def generation(self, path: str) -> int:
    return os.stat(path).st_mtime_ns

  def write(self, bucket: str, name: str, data: bytes) -> None:
    path = self.file(bucket, name)
    with self._lock:
      old = self.generation(path) if os.path.isfile(path) else 0
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f"{path}.{uuid.uuid4().hex}.upload"
      with open(tmp, "wb") as f:
        f.write(data)
      os.replace(tmp, path)
      if self.generation(path) <= old:  # A new generation for every write.
        os.utime(path, ns=(old + 1, old + 1))

  def names(self, bucket: str) -> list[str]:
    top = os.path.join(self.root, bucket)
    out = []
    for dirpath, _, files in os.walk(top):
      rel = os.path.relpath(dirpath, top)
      for f in files:
        if not f.endswith(".upload"):
          out.append(f if rel == "." else f"{rel.replace(os.sep, '/')}/{f}")
    return sorted(out)

  def stop(self) -> None:
    self.shutdown()
    self.server_close()


# ----------------------------------------------------------------------------------
# The fixture.
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class FakeBucket:
  root: str  # The local folder holding the buckets.
  server: FakeGcsServer

  def url(self, key: str = "") -> str:
    return f"gs://{BUCKET}/{key}" if key else f"gs://{BUCKET}"

  def local(self, key: str = "") -> str:
    """The local file or folder behind gs://BUCKET/key."""
    return os.path.join(self.root, BUCKET, *key.split("/")) if key else self.path

  @property
  def path(self) -> str:
    return os.path.join(self.root, BUCKET)

  def keys(self) -> list[str]:
    """Every object in the bucket, sorted."""
    return self.server.names(BUCKET)


def _clear_fsspec_caches() -> None:
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://fake-bucket/ on a local folder for epath/fsspec, tensorstore, array_record and
  google-cloud-storage (see the module doc); gcsfs, if installed, is not used."""
  root = str(tmp_path / "gcs")
  os.makedirs(os.path.join(root, BUCKET))
  fs_class = type("LocalBucketFSForTest", (LocalBucketFS,), {"root": root})
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, protocol, fs_class)
  _clear_fsspec_caches()
  server = FakeGcsServer(root)
  monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", server.url)
  monkeypatch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "fake-token")
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", server.url)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
  try:
    yield FakeBucket(root, server)
  finally:
    server.stop()
    _clear_fsspec_caches()


@pytest.fixture
def real_gcsfs(fake_gcs, monkeypatch):
  """`fake_gcs` reached through the real gcsfs (the `gcs` extra) instead of `LocalBucketFS`:
  gcsfs speaks the JSON API to `FakeGcsServer` (STORAGE_EMULATOR_HOST). Skipped without it."""
  gcsfs = pytest.importorskip("gcsfs")
  if hasattr(gcsfs.GCSFileSystem, "_lookup_bucket_type"):  # gcsfs's zonal/HNS detection:

    async def plain_bucket(self, bucket):  # a gRPC call per request when it cannot tell.
      return sys.modules["gcsfs.extended_gcsfs"].BucketType.NON_HIERARCHICAL

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_lookup_bucket_type", plain_bucket)
  registry = sys.modules["fsspec.registry"]._registry
  for protocol in ("gs", "gcs"):
    monkeypatch.delitem(registry, protocol, raising=False)
  gcsfs.GCSFileSystem.clear_instance_cache()
  _clear_fsspec_caches()
  yield fake_gcs
  gcsfs.GCSFileSystem.clear_instance_cache()
  _clear_fsspec_caches()


@pytest.fixture
def no_gcs_backend(monkeypatch):
  """As if gcsfs were not installed (and no fake registered): gs:// cannot be opened."""
  registry = sys.modules["fsspec.registry"]._registry
  for protocol in ("gs", "gcs"):
    monkeypatch.delitem(registry, protocol, raising=False)
  monkeypatch.setitem(sys.modules, "gcsfs", None)
  _clear_fsspec_caches()
  yield
  _clear_fsspec_caches()


@pytest.fixture(params=["LocalBucketFS", "gcsfs"])
def gcs_bucket(request):
  """`fake_gcs` through the fsspec fake, then through the real gcsfs (`real_gcsfs`, skipped
  without it): every test using it runs once with each."""
  return request.getfixturevalue("fake_gcs" if request.param == "LocalBucketFS" else "real_gcsfs")
