"""Two v5e-256 slices (queued resource with --node-count 2): data parallel across the slices
over the data-centre network, FSDP inside each slice (16x16, 16 GiB HBM per chip).

Fits and per-device memory of each LVM size: `python launch.py lvm train --config lvm/configs/vqlm_7b.py:SIZE
--tpu tpu_configs/multislice_2x_v5e_256.py --check` (README, "Run on a TPU pod").
"""
from core.mesh import SliceConfig
from tpu_configs.rules import FSDP_TENSOR_RULES


def get_config():
  return SliceConfig(
      name='2x-v5e-256',
      accelerator_type='v5litepod-256',
      runtime_version='v2-alpha-tpuv5-lite',
      num_hosts=128,  # 64 per slice x 2 slices
      devices_per_host=4,
      ici_mesh=(1, -1, 1),  # data, fsdp, tensor
      dcn_mesh=(2, 1, 1),
      peak_flops_per_device=197e12,  # bf16 dense peak per chip
      hbm_gib_per_device=16,
      logical_rules=FSDP_TENSOR_RULES,
      topology='v5e:16x16',
      zones=('us-west4-a', 'us-central1-a', 'us-south1-a', 'us-west1-c', 'europe-west4-b'),
  )
