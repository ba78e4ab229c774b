"""v5e-16 (v5litepod-16): 4 hosts x 4 chips (4x4), 16 GiB HBM each; FSDP over all 16.

Fits and per-device memory of each LVM size: `python launch.py lvm train --config lvm/configs/vqlm_7b.py:SIZE
--tpu tpu_configs/v5e_16.py --check` (README, "Run on a TPU pod").
"""
from core.mesh import SliceConfig
from tpu_configs.rules import FSDP_TENSOR_RULES


def get_config():
  return SliceConfig(
      name='v5e-16',
      accelerator_type='v5litepod-16',
      runtime_version='v2-alpha-tpuv5-lite',
      num_hosts=4,
      devices_per_host=4,
      ici_mesh=(1, -1, 1),  # data, fsdp, tensor
      dcn_mesh=(1, 1, 1),
      peak_flops_per_device=197e12,  # bf16 dense peak per chip
      hbm_gib_per_device=16,
      logical_rules=FSDP_TENSOR_RULES,
      topology='v5e:4x4',
      zones=('us-west4-a', 'us-central1-a', 'us-south1-a', 'us-west1-c', 'europe-west4-b'),
  )
