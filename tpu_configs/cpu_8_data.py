"""Eight forced host devices, data parallel only: the quickstart's LVM preset (its default `--tpu`).

On a 2-core EPYC the tiny LVM's step ran 0.18-0.20 s here against 0.22-0.24 s on `cpu_8`, whose
fsdp and tensor axes gather and scatter parameters and activations between devices that share the
same cores (300-step runs, alternating; docs/benchmarks_cpu.md). `cpu_8` stays the preset that puts
every mesh axis to use, for tests and for checking a layout before a pod.

  python launch.py lvm train --config lvm/configs/tiny.py --tpu tpu_configs/cpu_8_data.py ...
"""
from core.mesh import SliceConfig
from tpu_configs.rules import DATA_PARALLEL_RULES


def get_config():
  return SliceConfig(
      name='cpu-8-data',
      accelerator_type='cpu',
      runtime_version='',
      num_hosts=1,
      devices_per_host=8,
      ici_mesh=(8, 1, 1),  # data, fsdp, tensor
      dcn_mesh=(1, 1, 1),
      peak_flops_per_device=0,  # measured on the machine the run is on (core/peak_flops.py)
      hbm_gib_per_device=24 / 8,
      logical_rules=DATA_PARALLEL_RULES,
  )
