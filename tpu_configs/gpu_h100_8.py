"""One host with 8 H100s over NVLink: FSDP across the 8 GPUs.

Same commands as on a TPU slice; on several hosts each runs the same command and
`jax.distributed.initialize()` finds the others (SLURM, Open MPI), or give --coordinator:

  python launch.py lvm train --config lvm/configs/vqlm_7b.py:vqlm_1b --tpu tpu_configs/gpu_h100_8.py --workdir DIR
"""
from core.mesh import SliceConfig
from tpu_configs.rules import FSDP_TENSOR_RULES


def get_config():
  return SliceConfig(
      name='gpu-h100-8',
      accelerator_type='gpu-h100-80gb',
      runtime_version='',
      num_hosts=1,
      devices_per_host=8,
      ici_mesh=(1, -1, 1),  # data, fsdp, tensor inside a host (NVLink)
      dcn_mesh=(1, 1, 1),  # across hosts (data-centre network)
      peak_flops_per_device=989e12,  # bf16 dense peak of an H100 SXM
      hbm_gib_per_device=79.6,  # 80 GB as the driver reports it (81559 MiB)
      logical_rules=FSDP_TENSOR_RULES,
  )
