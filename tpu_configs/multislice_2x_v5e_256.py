"""2x-v5e-2561"""
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
