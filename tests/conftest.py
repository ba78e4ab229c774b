"""Every test runs on CPU with 8 forced host devices (set before jax is first imported)."""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.host_memory import huge_page_env  # noqa: E402
from core.xla_flags import cpu_xla_flags  # noqa: E402

# The pytest-xdist workers and the launch.py children that tests start run as launch.py's job
# processes do, with huge pages for malloc's large blocks (core/host_memory.py).
os.environ.update(huge_page_env(os.environ) or {})

os.environ['XLA_FLAGS'] = cpu_xla_flags(os.environ.get('XLA_FLAGS', ''), 8)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests build the same model and step more than once (a run, then its resume; one retraining
# per counterfactual ranking; two processes against one): a compilation cache private to this test
# session serves the repeats. Each executable is still compiled for real once per session, the cache
# starts empty, and the child processes that tests start share it through the environment. The
# suite runs in pytest-xdist workers (pyproject's addopts): the controller makes the cache, the workers
# it starts inherit the variable below and share it (JAX writes cache entries atomically).
_COMPILE_CACHE = os.environ.get('TESTS_SESSION_COMPILE_CACHE') if os.environ.get('PYTEST_XDIST_WORKER') else None
if not _COMPILE_CACHE:
  _COMPILE_CACHE = tempfile.mkdtemp(prefix='jax-compile-cache-')
  atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
  os.environ['TESTS_SESSION_COMPILE_CACHE'] = _COMPILE_CACHE
os.environ['JAX_COMPILATION_CACHE_DIR'] = _COMPILE_CACHE
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.5'

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain reads absl flags (google/grain#1355)
