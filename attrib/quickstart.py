"""The attribution half of `launch.py quickstart`, on the built-in digits, end to end:

  diffusion model -> teacher rankings of training and test queries -> base features -> distilled
  embedder + ScaNN index -> evaluation (mAP before/after, latency) -> PNGs of attributions.

Every stage is a regular job (the same functions the CLI runs) and resumes: a rerun skips what is done.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core import progress
from core.config import load_config_file

ROOT = Path(__file__).resolve().parent.parent
FASTGDA_CONFIG = str(ROOT / 'attrib/configs/fastgda_digits.py')


def run(workdir: Path, full: bool = False, stage_prefix: str = 'attribution') -> dict:
  from attrib.commands import train_model_command
  from attrib.curation import teacher_command
  from attrib.distill import distill_command
  from attrib.evaluation import eval_command
  from attrib.features import features_command
  from attrib.query import draw_attribution
  from core.errors import stop_if_preempted
  config = load_config_file(FASTGDA_CONFIG)
  td = config.teacher_data
  clock = progress.Stopwatch()
  model_dir = workdir / 'attrib'
  cpu1 = str(ROOT / 'tpu_configs/cpu_1.py')

  def stage(n, text):
    progress.say(f'quickstart {stage_prefix} {n}/6: {text}')

  # The quick model trains 400 steps (under 3 minutes on 2 cores; its samples already have the prompted
  # class); --full trains the 2000 steps of attrib/configs/digits.py.
  stage(1, 'text-to-image diffusion model on the captioned digits')
  steps = [] if full else ['train.steps=400', 'optim.decay_steps=300']
  model = train_model_command(str(ROOT / 'attrib/configs/digits.py'), cpu1, str(model_dir), steps)
  stop_if_preempted(model, 'quickstart: the diffusion model')
  clock.lap('diffusion model')
  stage(2, f'AbU teacher: {td.train_queries} training queries x top {td.candidates}, '
           f'{td.test_queries} test queries x all images')
  stride = [f'score_timestep_stride={td.timestep_stride}']
  teacher_command(str(model_dir), td.train_queries, str(td.candidates), None, stride, split='train')
  teacher_command(str(model_dir), td.test_queries, str(td.test_candidates or 'all'), None, stride, split='test')
  clock.lap('teacher')
  stage(3, 'base features')
  features_command(str(model_dir), list(dict.fromkeys([config.feature, *config.compare_features])))
  clock.lap('features')
  stage(4, 'distil the embedder, embed and index the training set')
  distilled = distill_command(str(model_dir), FASTGDA_CONFIG, None, [])
  stop_if_preempted(distilled, 'quickstart: the distillation')
  clock.lap('distill')
  stage(5, 'evaluate against the teacher')
  evaluation = eval_command(str(model_dir))
  clock.lap('eval')
  stage(6, 'attribute test queries, write PNGs')
  pictures = attribution_pictures(model_dir, draw_attribution)
  clock.lap('pictures')
  student = f'FastGDA({config.feature})'
  first = f'mAP({config.map_at[0]})'
  base = {k: v[first]['mean'] for k, v in evaluation['map'].items() if not k.startswith('FastGDA')}
  return {'model_samples_class_agreement': model.get('samples', {}).get('nearest_neighbour_class_agreement'),
          'map_at': first, 'base_features': base, 'best_base_feature': max(base, key=base.get),
          'student': evaluation['map'][student][first]['mean'], 'latency_ms': evaluation['latency_ms'],
          'teacher_s_per_query': evaluation['teacher_s_per_query'],
          'speedup_vs_teacher': evaluation['speedup_vs_teacher'], 'scale_a': distilled.get('scale_a'),
          'student_vs_best_base': evaluation.get('student_vs_best_base'),
          'student_vs_own_base': evaluation.get('student_vs_own_base'),
          'pictures': pictures, 'workdir': str(model_dir), 'stage_seconds': clock.stages}


def attribution_pictures(model_dir: Path, draw, count: int = 4, k: int = 8) -> list[str]:
  from attrib.attributor import Attributor
  attributor = Attributor.load(model_dir)
  queries = np.load(model_dir / 'teacher' / 'queries.npz')
  paths = []
  for q in range(min(count, len(queries['images']))):
    prompt = str(queries['prompts'][q])
    result = attributor.attribute(image=queries['images'][q], prompt=prompt, k=k)
    path = model_dir / f'attribution_query{q}.png'
    draw(queries['images'][q][..., 0], prompt, attributor.train_images, result, path)
    paths.append(str(path))
  return paths


def print_summary(summary: dict) -> None:
  lines = [f"\nattribution on the digits ({summary['map_at']} against the AbU teacher, test queries):"]
  for name, value in sorted(summary['base_features'].items(), key=lambda kv: -kv[1]):
    lines.append(f'  base feature {name:<14} {value:.3f}')
  best = summary['best_base_feature']
  line = (f"  distilled (FastGDA)         {summary['student']:.3f}   "
          f"({summary['student'] - summary['base_features'][best]:+.3f} over {best}")
  paired = (summary.get('student_vs_best_base') or {}).get(summary['map_at'])
  if paired and summary['student_vs_best_base']['feature'] == best:
    line += f"; per query {paired['difference']:+.3f} ± {paired['stderr']:.3f}, ahead on {paired['wins']}/{paired['queries']}"
  lines.append(line + ')')
  own = summary.get('student_vs_own_base')
  if own and own.get(summary['map_at']):
    paired = own[summary['map_at']]
    lines.append(f"  distilled against its own input {own['feature']}: per query {paired['difference']:+.3f} ± "
                 f"{paired['stderr']:.3f}, ahead on {paired['wins']}/{paired['queries']}")
  lat = summary['latency_ms']
  teacher = summary['teacher_s_per_query']
  lines.append(f"  attribute(): p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms (features included)"
               + (f"; teacher {teacher:.1f} s per query -> {summary['speedup_vs_teacher']:,.0f}x" if teacher else ''))
  lines.append('  pictures: ' + ', '.join(summary['pictures']))
  if summary.get('workdir'):  # the model's workdir (WORKDIR/attrib): where a user's own query goes
    work, prompt = summary['workdir'], '"a handwritten seven"'
    lines.append(f'  your own query: python launch.py attrib generate --workdir {work} --prompt {prompt} --seed 3 '
                 f'--out q.png, then python launch.py attrib query --workdir {work} --image q.png --prompt {prompt}')
  print('\n'.join(lines))
