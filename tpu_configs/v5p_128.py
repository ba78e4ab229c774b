"""v5p-128: 16 hosts x 4 v5p chips (4x4x4 torus, megacore), 95 GiB HBM each; FSDP x tensor 4.

Fits and per-device memory of each LVM size: `python launch.py lvm train --config lvm/configs/vqlm_7b.py:SIZE
--tpu tpu_configs/v5p_128.py --check` (README, "Run on a TPU pod").
"""
from core.mesh import SliceConfig
from tpu_configs.rules import FSDP_TENSOR_RULES


def get_config():
  return SliceConfig(
      name='v5p-128',
      accelerator_type='v5p-128',
      runtime_version='v2-alpha-tpuv5',
      num_hosts=16,
      devices_per_host=4,
      ici_mesh=(1, -1, 4),  # data, fsdp, tensor
      dcn_mesh=(1, 1, 1),
      peak_flops_per_device=459e12,  # bf16 dense peak per chip
      hbm_gib_per_device=95,
      logical_rules=FSDP_TENSOR_RULES,
      topology='v5:4x4x4',
      zones=('us-east5-a', 'us-central1-a', 'europe-west4-b'),
  )
