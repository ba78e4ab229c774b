"""v6e-256 (Trillium): 64 hosts x 4 chips (16x16), 32 GiB HBM each; FSDP x tensor 4.

Fits and per-device memory of each LVM size: `python launch.py lvm train --config lvm/configs/vqlm_7b.py:SIZE
--tpu tpu_configs/v6e_256.py --check` (README, "Run on a TPU pod").
"""
from core.mesh import SliceConfig
from tpu_configs.rules import FSDP_TENSOR_RULES


def get_config():
  return SliceConfig(
      name='v6e-256',
      accelerator_type='v6e-256',
      runtime_version='v2-alpha-tpuv6e',
      num_hosts=64,
      devices_per_host=4,
      ici_mesh=(1, -1, 4),  # data, fsdp, tensor
      dcn_mesh=(1, 1, 1),
      peak_flops_per_device=918e12,  # bf16 dense peak per chip
      hbm_gib_per_device=32,
      logical_rules=FSDP_TENSOR_RULES,
      topology='v6e:16x16',
      zones=('us-east5-b', 'us-central1-b', 'us-east1-d', 'us-east5-a', 'europe-west4-a'),
  )
