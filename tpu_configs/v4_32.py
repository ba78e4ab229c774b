"""v4-32: 4 hosts x 4 v4 chips (2x2x4 torus), 32 GiB HBM each; FSDP over all 16.

Fits and per-device memory of each LVM size: `python launch.py lvm train --config lvm/configs/vqlm_7b.py:SIZE
--tpu tpu_configs/v4_32.py --check` (README, "Run on a TPU pod").
"""
from core.mesh import SliceConfig
from tpu_configs.rules import FSDP_TENSOR_RULES


def get_config():
  return SliceConfig(
      name='v4-32',
      accelerator_type='v4-32',
      runtime_version='tpu-ubuntu2204-base',
      num_hosts=4,
      devices_per_host=4,
      ici_mesh=(1, -1, 1),  # data, fsdp, tensor
      dcn_mesh=(1, 1, 1),
      peak_flops_per_device=275e12,  # bf16 dense peak per chip
      hbm_gib_per_device=32,
      logical_rules=FSDP_TENSOR_RULES,
      topology='v4:2x2x4',
      zones=('us-central2-b',),
  )
