"""Job processes run with huge pages for malloc's large blocks (core/host_memory.py)."""
import os
import subprocess
import sys

from core.host_memory import HUGE_PAGES, huge_page_env
from tests.helpers import ROOT


def test_the_tunable_is_added_once_and_a_users_malloc_tunables_are_kept():
  assert huge_page_env({'A': '1'}) == {'A': '1', 'GLIBC_TUNABLES': HUGE_PAGES}
  # Other tunables stay; the restarted process finds the tunable and is not restarted again.
  env = huge_page_env({'GLIBC_TUNABLES': 'glibc.rtld.optional_static_tls=2048'})
  assert env['GLIBC_TUNABLES'] == f'glibc.rtld.optional_static_tls=2048:{HUGE_PAGES}'
  assert huge_page_env(env) is None
  assert huge_page_env({'GLIBC_TUNABLES': 'glibc.malloc.mmap_threshold=65536'}) is None


def test_a_process_restarts_itself_with_the_tunable_and_its_arguments():
  # Everything before the restart runs twice: the first line prints once per process image.
  script = (f'import os, sys; sys.path.insert(0, {str(ROOT)!r}); print("start", os.getpid(), sys.argv[1:]); '
            'from core.host_memory import restart_with_huge_pages; restart_with_huge_pages(); '
            'print("tunables", os.environ.get("GLIBC_TUNABLES"))')
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  out = subprocess.run([sys.executable, '-c', script, 'x', '--y'], env=env, capture_output=True, text=True,
                       timeout=60, check=True).stdout.splitlines()
  assert out[0] == out[1] and out[0].endswith("['x', '--y']")  # same pid, same arguments
  assert out[2] == f'tunables {HUGE_PAGES}'
  assert len(out) == 3
