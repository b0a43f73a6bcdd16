"""Test set-up: 8 fake CPU devices (set before JAX starts) and absl flags parsed.

Grain's multiprocess prefetch reads absl flags, so they are parsed here once for the
whole session.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS([sys.argv[0]])
