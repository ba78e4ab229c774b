"""`attribute(image, prompt)` at MSCOCO scale with the features included: FastGDA reports 18.7 ms on an A100.

Full-size towers with random weights (DINO ViT-B/16 as transformers `ViTModel`, CLIP ViT-B/32 as
`CLIPModel`: the time does not depend on the weights' values; the CLIP tokenizer is byte-level, and the
text tower always runs its 77 padded positions, as with CLIP's own BPE), the paper's embedder (1280 →
768 × 3 → 768, attrib/configs/fastgda_coco.py) distilled for one epoch on random features of 118,287
training images, and the ScaNN index over their embeddings (tree + AH + exact reorder at this size).
One query = read the image file, preprocess (resize 256, crop 224), DINO forward, CLIP tokenisation and
text forward, embed, search: one `attribute()` call, as a user makes it. Reported: p50 / p95 / mean of
`--queries` calls after warm-up, and the same for the feature step alone and for the search alone
(`attribute(features=φ)`), and the same φ through transformers on torch CPU (same file, same
preprocessing) as the in-run peer of the feature step, each in this one run.

  .venv/bin/python benchmarks/attribute_latency.py [--rows 118287] [--queries 50] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import pickle
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine as this_machine  # noqa: E402

this_machine.prepare(device_count=1)
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def full_size_towers(folder: Path) -> tuple[Path, Path]:
  """Random-weight DINO ViT-B/16 and CLIP ViT-B/32 at their released sizes, saved as HF checkpoints."""
  import torch
  import transformers
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  torch.manual_seed(0)
  dino, clip = folder / 'dino-vitb16', folder / 'clip-vit-base-patch32'
  transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=False).save_pretrained(dino)
  # CLIPConfig() defaults are openai/clip-vit-base-patch32's: text 512 x 12, vision 768 x 12 at patch 32.
  transformers.CLIPModel(transformers.CLIPConfig()).save_pretrained(clip)
  symbols = list(bytes_to_unicode().values())
  vocab = symbols + [s + '</w>' for s in symbols] + ['<|startoftext|>', '<|endoftext|>']
  (folder / 'vocab.json').write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / 'merges.txt').write_text('#version: 0.2\n')
  transformers.CLIPTokenizerFast(vocab_file=str(folder / 'vocab.json'),
                                 merges_file=str(folder / 'merges.txt')).save_pretrained(clip)
  return dino, clip


def random_release(folder: Path, rows: int, dim: int = 1280, queries: int = 256, candidates: int = 100) -> Path:
  """FastGDA's feature and rank layout filled with random values: enough to distil an embedder of the
  paper's shape (its answers are meaningless; its cost is the real one)."""
  rng = np.random.default_rng(0)
  feats = folder / 'feats' / 'dino+clip_text'
  feats.mkdir(parents=True)
  np.save(feats / 'data_feats.npy', rng.standard_normal((rows, dim), dtype=np.float32))
  np.save(feats / 'train_query_feats.npy', rng.standard_normal((queries, dim), dtype=np.float32))
  ranks = np.stack([rng.choice(rows, candidates, replace=False) for _ in range(queries)])
  with open(folder / 'influence_train.pkl', 'wb') as f:
    pickle.dump({'random': {'rank': ranks}}, f)
  return feats


def query_photos(folder: Path, count: int = 8) -> list[str]:
  """Crops of scikit-learn's two bundled photos, saved as PNG files (the user hands a path)."""
  from PIL import Image
  from sklearn.datasets import load_sample_images
  photos, rng, paths = load_sample_images().images, np.random.default_rng(1), []
  for n in range(count):
    y, x = rng.integers(0, 100, 2)
    path = folder / f'query{n}.png'
    Image.fromarray(photos[n % 2][y:y + 320, x:x + 480]).save(path)
    paths.append(str(path))
  return paths


def percentiles(call, count: int, warmup: int = 3) -> dict:
  for n in range(warmup):
    call(n)
  times = []
  for n in range(count):
    start = time.perf_counter()
    call(n)
    times.append((time.perf_counter() - start) * 1e3)
  return {'p50_ms': float(np.percentile(times, 50)), 'p95_ms': float(np.percentile(times, 95)),
          'mean_ms': float(np.mean(times)), 'calls': count}


def transformers_features(dino: Path, clip: Path):
  """The same φ through transformers on torch (the towers' reference implementation), from the same
  file and the same preprocessing: the in-run peer of our feature step."""
  import torch
  import transformers
  from PIL import Image
  from attrib.vision_towers import preprocess_dino
  vit = transformers.ViTModel.from_pretrained(dino, add_pooling_layer=False).eval()
  clip_model = transformers.CLIPModel.from_pretrained(clip).eval()
  tokenizer = transformers.CLIPTokenizerFast.from_pretrained(clip)

  def features(path: str, prompt: str) -> np.ndarray:
    with torch.no_grad():
      pixels = torch.from_numpy(preprocess_dino(Image.open(path))[None].transpose(0, 3, 1, 2).copy())
      image = vit(pixel_values=pixels).last_hidden_state[:, 0]
      tokens = tokenizer([prompt], padding='max_length', max_length=77, truncation=True, return_tensors='pt')
      text = clip_model.get_text_features(**tokens)
      return torch.cat([image, text], dim=1).numpy()
  return features


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rows', type=int, default=118_287)
  parser.add_argument('--queries', type=int, default=50)
  parser.add_argument('--out', default=str(Path(__file__).with_name('results_attribute_latency_cpu.json')))
  this_machine.add_isa_argument(parser)
  args = parser.parse_args(argv)
  machine = dict(this_machine.describe(), python=platform.python_version())
  this_machine.say(machine)
  from attrib import Attributor
  from launch import main as launch_main
  with tempfile.TemporaryDirectory(prefix='attribute_latency_') as scratch:
    folder = Path(scratch)
    started = time.perf_counter()
    dino, clip = full_size_towers(folder)
    feats = random_release(folder, args.rows)
    student = folder / 'student'
    assert launch_main(['attrib', 'distill', '--config', str(ROOT / 'attrib/configs/fastgda_coco.py'),
                        '--workdir', str(student), '--features', str(feats),
                        '--ranks', str(folder / 'influence_train.pkl'), '--set', 'distill.epochs=1']) == 0
    setup_s = time.perf_counter() - started
    attributor = Attributor.load(student, dino=str(dino), clip=str(clip))
    photos = query_photos(folder)
    prompts = ['a red double-decker bus on a city street', 'a bowl of fruit on a wooden table',
               'two people skiing down a snowy slope', 'a cat asleep on a sofa']
    phi = attributor.features(photos[:4], prompts)
    result = {
        'rows': args.rows, 'index': attributor.index.meta['kind'], 'feature': 'dino+clip_text',
        'setup_s': setup_s, 'machine': machine,
        'attribute_image_prompt': percentiles(
            lambda n: attributor.attribute(image=photos[n % len(photos)], prompt=prompts[n % 4], k=10), args.queries),
        'features_only': percentiles(
            lambda n: attributor.features([photos[n % len(photos)]], [prompts[n % 4]]), args.queries),
        'search_only': percentiles(lambda n: attributor.attribute(features=phi[n % 4], k=10), args.queries),
        'paper_a100_ms': 18.7,
    }
    reference = transformers_features(dino, clip)
    result['transformers_features'] = percentiles(
        lambda n: reference(photos[n % len(photos)], prompts[n % 4]), args.queries)
    result['features_speedup_vs_transformers'] = (result['transformers_features']['p50_ms']
                                                  / result['features_only']['p50_ms'])
  for name in ('attribute_image_prompt', 'features_only', 'search_only', 'transformers_features'):
    r = result[name]
    print(f"{name}: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f}, mean {r['mean_ms']:.1f} ({r['calls']} calls)")
  print(f"our feature step {result['features_speedup_vs_transformers']:.2f}x transformers' (p50); index "
        f"{result['index']} over {args.rows} rows; the paper: 18.7 ms on an A100", flush=True)
  Path(args.out).write_text(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
