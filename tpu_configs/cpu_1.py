"""One CPU device, no sharding: the reference layout that sharded runs must match."""
from core.mesh import SliceConfig
from tpu_configs.rules import FSDP_TENSOR_RULES


def get_config():
  return SliceConfig(
      name='cpu-1',
      accelerator_type='cpu',
      runtime_version='',
      num_hosts=1,
      devices_per_host=1,
      ici_mesh=(1, 1, 1),
      dcn_mesh=(1, 1, 1),
      peak_flops_per_device=0,  # measured on the machine the run is on (core/peak_flops.py)
      hbm_gib_per_device=24,
      logical_rules=FSDP_TENSOR_RULES,
  )
