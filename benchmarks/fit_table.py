"""Which LVM size fits on which TPU preset: the fit check (core/fit_check.py) for every pair.

Each cell compiles the real training step of `lvm/configs/vqlm_7b.py:<size>` (LVM's recipe: 4096
tokens per record, global batch 128 in 4 accumulated micro-steps, full remat, bf16 compute, f32
parameters and Adam state) for the preset's TPU topology on this CPU, and reads the TPU compiler's
per-device memory. A preset whose `batch` mesh axes outnumber the 32 rows of a micro-step gets the
smallest global batch that splits (recorded in the row). Needs the `tpu` extra (libtpu).

  .venv/bin/python benchmarks/fit_table.py [--sizes vqlm_100m,vqlm_7b] [--out benchmarks/results_fit_table.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

os.environ['JAX_PLATFORMS'] = 'cpu'
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.config import apply_overrides, load_config_file  # noqa: E402
from core.errors import ConfigError  # noqa: E402
from core.fit_check import lvm_fit_report  # noqa: E402
from core.mesh import load_preset, resolve_sizes  # noqa: E402
from lvm.model_config import PRESETS  # noqa: E402

TPU_PRESETS = ['v4_8', 'v4_32', 'v5e_16', 'v5p_128', 'v6e_256', 'multislice_2x_v5e_256']


def batch_ways(preset) -> int:
  """How many ways the `batch` rule splits rows on this preset's mesh (data x fsdp here)."""
  num_slices = math.prod(s for s in preset.dcn_mesh if s != -1)
  ici = resolve_sizes(preset.ici_mesh, preset.num_devices // num_slices, preset.name)
  sizes = {axis: i * d for axis, i, d in zip(('data', 'fsdp', 'tensor'), ici, preset.dcn_mesh)}
  target = dict(preset.logical_rules)['batch']
  axes = (target,) if isinstance(target, str) else tuple(target or ())
  return math.prod(sizes[a] for a in axes)


def markdown(rows: list[dict]) -> str:
  """LVM sizes down, presets across; each cell: verdict and peak GiB per device (% of HBM)."""
  presets = list(dict.fromkeys(r['preset'] for r in rows))
  sizes = list(dict.fromkeys(r['size'] for r in rows))
  cell = {(r['preset'], r['size']): r for r in rows}
  lines = ['| LVM size | ' + ' | '.join(presets) + ' |', '|---|' + '---|' * len(presets)]
  for size in sizes:
    params = next(r['params'] for r in rows if r['size'] == size)
    out = []
    for preset in presets:
      r = cell.get((preset, size))
      if r is None:
        out.append('')
      elif 'peak_gib' not in r:
        out.append('cannot lay out')
      else:
        verdict = 'fits' if r['fits'] else '**no**'
        out.append(f"{verdict} {r['peak_gib']:.1f} / {r['hbm_gib']:g} GiB")
    lines.append(f'| {size} ({params / 1e9:.2f}B) | ' + ' | '.join(out) + ' |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sizes', default=','.join(n for n in PRESETS if n.startswith('vqlm')))
  parser.add_argument('--presets', default=','.join(TPU_PRESETS))
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results_fit_table.json'))
  parser.add_argument('--markdown', action='store_true', help='print the README table of --out and exit')
  args = parser.parse_args()
  if args.markdown:
    print(markdown(json.loads(Path(args.out).read_text())['rows']))
    return
  # Cells already measured (an earlier run) are kept unless measured again now.
  out = Path(args.out)
  rows = json.loads(out.read_text())['rows'] if out.exists() else []
  for preset_name in args.presets.split(','):
    preset = load_preset(ROOT / 'tpu_configs' / f'{preset_name}.py')
    for size in args.sizes.split(','):
      config = load_config_file(ROOT / 'lvm/configs/vqlm_7b.py', size)
      ways, accum = batch_ways(preset), config.optim.grad_accum
      if (config.train.global_batch // accum) % ways:
        config = apply_overrides(config, [f'train.global_batch={ways * accum}'])
      try:
        fit = lvm_fit_report(config, preset)
        report = {**dataclasses.asdict(fit), 'fits': fit.fits}
      except (ConfigError, NotImplementedError) as e:  # a mesh that cannot be laid out on the topology
        report = {'preset': preset.name, 'error': f'{type(e).__name__}: {e}', 'fits': False}
      row = {'size': size, 'params': config.model.num_params(), 'global_batch': config.train.global_batch,
             **report}
      rows = [r for r in rows if (r['preset'], r['size']) != (preset.name, size)] + [row]
      verdict = 'fits' if row['fits'] else 'DOES NOT FIT'
      print(f"{preset.name:>12} {size:>10}  batch {row['global_batch']:>4}  {verdict:>12}  "
            f"peak {row.get('peak_gib', float('nan')):6.2f} / {row.get('hbm_gib', 0):g} GiB  "
            f"compile {row.get('compile_s', 0):4.0f} s {row['error'][:120]}", flush=True)
      out.write_text(json.dumps({'rows': rows}, indent=1))


if __name__ == '__main__':
  main()
