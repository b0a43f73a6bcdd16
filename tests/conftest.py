"""Test set-up: 8 fake CPU devices (set before JAX starts), one persistent XLA compilation
cache for the session, and absl flags parsed.

The cache: the CLI tests run the same tiny configs in many subprocesses (straight runs,
killed and resumed runs, every task), and each would compile the same programs again; with
`JAX_COMPILATION_CACHE_DIR` set here, before JAX starts, the in-process compiles and every
subprocess (they inherit the environment) reuse them. Its key is the program and the
compile options, so a changed program always compiles. The folder is made once by the
pytest process that starts the session (xdist workers inherit it) and removed at its exit;
a test that sets its own cache folder keeps it.

Grain's multiprocess prefetch reads absl flags, so they are parsed here once for the
whole session. The gs:// fixtures (`fake_gcs`, `real_gcsfs`, `gcs_bucket`, `no_gcs_backend`) are in
tests/fake_gcs.py.
"""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="beit_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS([sys.argv[0]])

from tests.fake_gcs import fake_gcs, gcs_bucket, no_gcs_backend, real_gcsfs  # noqa: E402, F401
