"""Eight forced host devices on one CPU: the test and laptop preset with every mesh axis in use.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python launch.py lvm train --tpu tpu_configs/cpu_8.py ...
"""
from core.mesh import SliceConfig
from tpu_configs.rules import FSDP_TENSOR_RULES


def get_config():
  return SliceConfig(
      name='cpu-8',
      accelerator_type='cpu',
      runtime_version='',
      num_hosts=1,
      devices_per_host=8,
      ici_mesh=(2, 2, 2),  # data, fsdp, tensor
      dcn_mesh=(1, 1, 1),
      peak_flops_per_device=0,  # measured on the machine the run is on (core/peak_flops.py)
      hbm_gib_per_device=24 / 8,
      logical_rules=FSDP_TENSOR_RULES,
  )
