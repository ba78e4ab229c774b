"""The shared engine: mesh, logical sharding, sharded init, optimizer, train loop, checkpoints, metrics.

`core` knows nothing of LVM or attribution: a model family plugs in through `core.task.Task`.
"""

from core.xla_flags import apply_library_defaults as _apply_library_defaults

# Before any backend starts: a script importing the package gets the CPU flags launch.py would set.
_apply_library_defaults()
