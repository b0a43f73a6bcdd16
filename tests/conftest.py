"""Test set-up: 8 fake CPU devices (set before JAX starts) and absl flags parsed.

Grain's multiprocess prefetch reads absl flags, so they are parsed here once for the
whole session. The gs:// fixtures (`fake_gcs`, `real_gcsfs`, `gcs_bucket`, `no_gcs_backend`) are in
tests/fake_gcs.py.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS([sys.argv[0]])

from tests.fake_gcs import fake_gcs, gcs_bucket, no_gcs_backend, real_gcsfs  # noqa: E402, F401
