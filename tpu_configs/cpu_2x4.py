"""Two processes x four forced CPU devices: a two-host "pod" on one machine, for multi-host tests.

Start one process per host with an explicit coordinator (gloo carries the collectives):

  for i in 0 1; do python launch.py lvm train --tpu tpu_configs/cpu_2x4.py ... \\
      --coordinator 127.0.0.1:9876 --num-processes 2 --process-id $i & done
"""
from core.mesh import SliceConfig
from tpu_configs.rules import FSDP_TENSOR_RULES


def get_config():
  return SliceConfig(
      name='cpu-2x4',
      accelerator_type='cpu',
      runtime_version='',
      num_hosts=2,
      devices_per_host=4,
      ici_mesh=(2, 2, 2),  # data, fsdp, tensor: the same mesh as cpu_8, so results must match it
      dcn_mesh=(1, 1, 1),
      peak_flops_per_device=0,  # measured on the machine the run is on (core/peak_flops.py)
      hbm_gib_per_device=24 / 8,
      logical_rules=FSDP_TENSOR_RULES,
  )
