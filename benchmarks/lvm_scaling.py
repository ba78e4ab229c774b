"""LVM's scaling figure in miniature: three decoder sizes trained on the same visual sentences for
the same steps; held-out perplexity of the last frame, overall and per task kind.

Uses the sentences a quickstart run built (tokenizer -> digit sentences, train and held-out images):

  .venv/bin/python launch.py quickstart --lvm-only --workdir runs/quickstart
  .venv/bin/python benchmarks/lvm_scaling.py --data runs/quickstart/data --workdir runs/scaling [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # hidden, intermediate, layers, heads
    'xs': (64, 172, 2, 2),
    's (the tiny preset)': (128, 344, 2, 4),
    'm': (256, 688, 4, 4),
}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--data', required=True, help='directory with train/ and eval/ sentences from lvm tokenize')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--tpu', default=str(ROOT / 'tpu_configs/cpu_8.py'))
  parser.add_argument('--out', default=str(ROOT / 'benchmarks/results_lvm_scaling_cpu.json'))
  args = parser.parse_args()
  from launch import main as launch_main
  data = Path(args.data)
  manifest = json.loads((data / 'train' / 'manifest.json').read_text())
  rows = []
  for name, (hidden, ffn, layers, heads) in SIZES.items():
    work = Path(args.workdir) / name.split()[0]
    settings = [f'data.train_path={data / "train"}', f'model.vocab_size={manifest["vocab_size"]}',
                f'data.seq_len={manifest["seq_len"]}', f'model.hidden_size={hidden}', f'model.intermediate_size={ffn}',
                f'model.num_layers={layers}', f'model.num_kv_heads={heads}', f'model.num_heads={heads}',
                f'train.steps={args.steps}', 'train.progress_bar=false', f'optim.decay_steps={args.steps - 20}']
    assert launch_main(['lvm', 'train', '--config', str(ROOT / 'lvm/configs/tiny.py'), '--tpu', args.tpu,
                        '--workdir', str(work)] + sum([['--set', s] for s in settings], [])) == 0
    assert launch_main(['lvm', 'eval', '--workdir', str(work), '--data', str(data / 'eval')]) == 0
    train = json.loads((work / 'train_result.json').read_text())
    evaluation = json.loads((work / 'eval_result.json').read_text())
    rows.append({'size': name, 'params': train['model_params'], 'steps': train['step'],
                 'train_loss': train['final_metrics']['loss'], 'perplexity': evaluation['perplexity'],
                 'per_kind': {k: v['perplexity'] for k, v in evaluation.get('per_kind', {}).items()}})
    print(f"{name:<20} {rows[-1]['params']:>9,} params  held-out perplexity {rows[-1]['perplexity']:.2f}  "
          + '  '.join(f'{k} {v:.1f}' for k, v in rows[-1]['per_kind'].items()))
  from core.xla_flags import cpu_isa_summary
  Path(args.out).write_text(json.dumps({'machine': cpu_isa_summary(), 'steps': args.steps, 'rows': rows}, indent=1))


if __name__ == '__main__':
  main()
