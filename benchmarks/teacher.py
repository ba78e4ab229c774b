"""AbU teacher seconds per query on the default digits model, against the same computation written
with diffusers' UNet2DConditionModel on torch CPU, in the same run.

Per query (Fisher and the base losses are per model and cached, so not counted): the gradient of
the query's loss over `query_grad_samples` (noise, t) draws w.r.t. the cross-attention K/V weights,
the Newton step, and the loss of every training image at 20 timesteps (stride 50).

  .venv/bin/python benchmarks/teacher.py [--candidates 1600] [--queries 2] [--isa AVX2]

The FLOP rate counts the U-Net forward's FLOPs as XLA's cost analysis gives them (a backward pass as
two forwards), against XLA's f32 GEMM peak measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402

machine.prepare()  # launch.py's CPU flags; --isa AVX2 holds XLA, torch and numpy to AVX2


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--candidates', type=int, default=1600)
  parser.add_argument('--queries', type=int, default=2)
  parser.add_argument('--out')
  machine.add_isa_argument(parser)
  args = parser.parse_args()
  described = machine.describe()
  machine.say(described)

  import jax
  import numpy as np
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet
  from flax import nnx
  from attrib.diffusion import NoiseSchedule
  from attrib.teacher import Teacher, TeacherConfig
  from attrib.unet import UNet2DConditionModel
  from core.torch_layout import params_to_diffusers
  from core.config import load_config_file
  from core.mesh import make_mesh

  root = Path(__file__).resolve().parent.parent
  config = load_config_file(root / 'attrib/configs/digits.py')
  teacher_config = TeacherConfig()
  c = config.unet
  rng = np.random.default_rng(0)
  m = args.candidates
  images = rng.uniform(-1, 1, (m, c.sample_size, c.sample_size, c.in_channels)).astype(np.float32)
  context = rng.standard_normal((m, config.data.text_len, c.cross_attention_dim)).astype(np.float32)
  ids = np.arange(m, dtype=np.int32)
  graphdef, state = nnx.split(UNet2DConditionModel(c, nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  preset = load_config_file(root / 'tpu_configs/cpu_1.py')
  schedule = NoiseSchedule(config.schedule)
  teacher = Teacher(graphdef, params, schedule, teacher_config, mesh=make_mesh(preset),
                    rules=preset.logical_rules, num_training_images=m)
  fisher = {k: np.full(v.shape, 1e-4, np.float32) for k, v in teacher.kv0.items()}
  base = teacher.losses(teacher.kv0, images, context, ids)

  def ours(q):
    kv = teacher.unlearn(fisher, images[q], context[q], q)
    return teacher.scores(kv, base, images, context, ids)

  b = min(teacher_config.candidate_batch, m)
  forward = jax.jit(lambda p, x, t, ctx: nnx.merge(graphdef, p)(x, t, ctx))
  cost = forward.lower(params, images[:b], np.zeros(b, np.int32), context[:b]).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  forward_flops = float(cost['flops']) / b
  score_steps = len(range(0, 1000, teacher_config.score_timestep_stride))
  flops_per_query = forward_flops * (m * score_steps + 3 * teacher_config.query_grad_samples)
  peak = machine.matmul_peak()

  ours(0)  # compile
  start = time.perf_counter()
  for q in range(1, 1 + args.queries):
    ours(q)
  ours_s = (time.perf_counter() - start) / args.queries

  # ---- the peer: the same computation with diffusers on torch CPU
  torch.manual_seed(0)
  model = TorchUNet(**c.diffusers_kwargs()).eval()
  model.load_state_dict({k: torch.tensor(v) for k, v in params_to_diffusers(params).items()})
  kv_params = [p for n, p in model.named_parameters() if 'attn2' in n and ('to_k' in n or 'to_v' in n)]
  for p in model.parameters():
    p.requires_grad_(False)
  alphas = torch.tensor(np.asarray(schedule.alphas_cumprod))
  x_all = torch.tensor(images).permute(0, 3, 1, 2).contiguous()
  ctx_all = torch.tensor(context)
  timesteps = torch.arange(0, 1000, teacher_config.score_timestep_stride)
  noise_all = torch.randn((len(timesteps),) + x_all.shape, generator=torch.Generator().manual_seed(0))
  fisher_t = [torch.full_like(p, 1e-4) for p in kv_params]

  def eps_loss(x0, ctx, noise, t):
    a = alphas[t].view(-1, 1, 1, 1)
    pred = model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, ctx).sample
    return ((pred - noise) ** 2).mean(dim=(1, 2, 3))

  def peer(q):
    for p in kv_params:
      p.requires_grad_(True)
    n = teacher_config.query_grad_samples
    g = torch.Generator().manual_seed(q)
    x0 = x_all[q:q + 1].expand(n, -1, -1, -1)
    loss = eps_loss(x0, ctx_all[q:q + 1].expand(n, -1, -1), torch.randn(x0.shape, generator=g),
                    torch.randint(0, 1000, (n,), generator=g)).mean()
    grads = torch.autograd.grad(loss, kv_params)
    originals = [p.detach().clone() for p in kv_params]
    with torch.no_grad():
      for p, gr, f in zip(kv_params, grads, fisher_t):
        p.add_(teacher_config.step_size / m * gr / f)
        p.requires_grad_(False)
      losses = torch.zeros(m)
      for start in range(0, m, teacher_config.candidate_batch):
        sl = slice(start, start + teacher_config.candidate_batch)
        for j, t in enumerate(timesteps):
          tt = torch.full((x_all[sl].shape[0],), int(t))
          losses[sl] += eps_loss(x_all[sl], ctx_all[sl], noise_all[j, sl], tt) / len(timesteps)
      for p, o in zip(kv_params, originals):
        p.copy_(o)
    return losses.numpy() - base

  peer(0)
  start = time.perf_counter()
  for q in range(1, 1 + args.queries):
    peer(q)
  peer_s = (time.perf_counter() - start) / args.queries
  gflops = flops_per_query / ours_s / 1e9
  result = {'machine': described, 'candidates': m, 'ours_s_per_query': ours_s, 'diffusers_torch_s_per_query': peer_s,
            'speedup': peer_s / ours_s, 'torch_threads': torch.get_num_threads(), 'peak': peak,
            'unet_forward_flops_per_image': forward_flops, 'ours_gflops': gflops,
            'fraction_of_xla_peak': gflops / peak['jax_f32_gflops']}
  print(f'teacher, {m} candidates x {len(timesteps)} timesteps: ours {ours_s:.1f} s/query, '
        f'diffusers+torch {peer_s:.1f} s/query -> {peer_s / ours_s:.2f}x')
  print(f"ours: {gflops:.0f} GFLOP/s = {100 * result['fraction_of_xla_peak']:.0f}% of XLA's GEMM peak "
        f"({peak['jax_f32_gflops']:.0f} GFLOP/s; numpy {peak['numpy_f32_gflops']:.0f})")
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
  main()
