"""v5p-1281"""
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
