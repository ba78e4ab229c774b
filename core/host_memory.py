"""Job processes run with transparent huge pages for malloc's large blocks (glibc on Linux).

XLA:CPU allocates an executable's temporary buffer afresh on every call and frees it afterwards
(390 MB for the digits U-Net's training step at batch 64). glibc serves blocks that large with
`mmap` and returns them with `munmap`, so every step faults its whole buffer in again, 4 KB at a
time: 95,000 faults and ~0.2 core-s of kernel time per U-Net step on a 2-core EPYC, a fifth of the
step's CPU time. With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` malloc asks for transparent huge pages
on those blocks (`madvise`; the kernel's THP mode is often `madvise`, which otherwise leaves them at
4 KB): a 100-step run of the digits U-Net faulted 0.49M times instead of 10.4M, its steps ran
0.42-0.48 s instead of 0.51-0.57 s, kernel time halved (docs/benchmarks_cpu.md, "Page faults").

Not kept, from the same measurements: freed memory kept in glibc's main heap instead (no faults at all)
made the loop's steps slower, 0.60-0.65 s, with malloc's free-list search at 15% of the profile.

glibc reads its tunables when a process starts, so `launch.py` restarts itself once with the
tunable set (`restart_with_huge_pages`); the children it starts inherit it. A user's own
`glibc.malloc` tunables are left as they are.
"""
from __future__ import annotations

import os
import sys

HUGE_PAGES = 'glibc.malloc.hugetlb=1'


def huge_page_env(environ) -> dict | None:
  """`environ` with the tunable added, or None when there is nothing to add: already set, the
  user's own malloc tunables, or not Linux (the tunable is glibc's; elsewhere it is ignored)."""
  if not sys.platform.startswith('linux'):
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.' in tunables:
    return None
  return dict(environ, GLIBC_TUNABLES=f'{tunables}:{HUGE_PAGES}' if tunables else HUGE_PAGES)


def restart_with_huge_pages() -> None:
  """Replaces this process by the same command with the tunable set (same pid, same arguments and
  interpreter options); returns at once when there is nothing to add. Call it first thing, before
  any work: everything before it runs twice."""
  env = huge_page_env(os.environ)
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    try:
      os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # no interpreter path to start again (an embedded Python): run without it
      pass
