"""Every test runs on CPU with 8 forced host devices (set before jax is first imported)."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.xla_flags import cpu_xla_flags  # noqa: E402

os.environ['XLA_FLAGS'] = cpu_xla_flags(os.environ.get('XLA_FLAGS', ''), 8)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain reads absl flags (google/grain#1355)
