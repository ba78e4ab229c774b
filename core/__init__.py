"""The shared engine: mesh, logical sharding, sharded init, optimizer, train loop, checkpoints, metrics.

`core` knows nothing of LVM or attribution: a model family plugs in through `core.task.Task`.
"""
