"""Every test runs on CPU with 8 forced host devices (set before jax is first imported)."""
import os
import sys
from pathlib import Path

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain reads absl flags (google/grain#1355)
