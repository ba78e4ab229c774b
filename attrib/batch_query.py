"""`launch.py attrib query --queries list.tsv`: attribute many generated images in one run.

The list holds `image path<TAB>prompt` lines (the training lists' format; relative paths from the
list's folder, gs:// too). Every image is checked to exist and open, and every prompt to be one the
student takes, before the student loads its first query; an image that fails to decode later is
named with its line. The answers go to OUT/results.jsonl, one JSON object per query in list order
(written whole at the end: a failed run leaves the previous results as they were), and with
`--grids` one PNG per query (OUT/grids/00001_<image name>.png, ...) as `attrib query` draws it.
"""
from __future__ import annotations

import json
from pathlib import PurePosixPath

from core.paths import as_path
from core.workdir import prepare_output_dir, versions, write_bytes_atomic

# Queries embedded and searched together: the features of a batch are computed in one call, so a
# large list stays within memory and shows progress.
BATCH = 256


def _query_input(attributor, image: str, listing, line: int):
  """The decoded query image, as the student's features take it (the digits' pixels, a photo for the
  towers); a file that opened but does not decode is named with its line of the list."""
  from attrib.query_images import AttributionError, digit_pixels, tower_image
  from attrib.tower_features import TowerFeaturizer
  try:
    return tower_image(image) if isinstance(attributor.featurizer[0], TowerFeaturizer) else digit_pixels(image)
  except AttributionError as e:
    raise AttributionError(f'{listing}:{line}: {e}') from None


def batch_query_command(workdir: str, queries: str, k: int | None, out: str | None, grids: bool,
                        dino: str | None = None, clip: str | None = None, train_list: str | None = None,
                        among: list[int] | None = None,
                        among_file: str | None = None) -> dict:
  from attrib.attributor import Attributor
  from attrib.query import draw_answer
  from attrib.query_images import AttributionError
  from attrib.tower_features import read_listed_images
  from core import progress
  attributor = Attributor.load(workdir, dino=dino, clip=clip, train_list=train_list)
  if attributor.featurizer is None:
    attributor.features([], [])  # raises: a student of precomputed features takes φ rows, not images
  images, prompts, lines = read_listed_images(queries, 'prompt')
  for prompt, line in zip(prompts, lines):
    try:
      attributor.check_prompt(prompt)
    except AttributionError as e:
      raise AttributionError(f'{as_path(queries)}:{line}: {e}') from None
  if among_file is not None:
    from attrib.among import among_from_file
    among = among_from_file(among_file, attributor)
  k, _ = attributor.checked_request(k, among)  # before any output folder is made
  out_dir = prepare_output_dir(out if out else as_path(workdir) / 'query_results', '--out' if out else 'the default --out')
  grid_dir = prepare_output_dir(out_dir / 'grids', '--out') if grids and attributor.train_images is not None else None
  full_scale = bool(dino or clip)
  records, unreadable = [], []
  starts = range(0, len(images), BATCH)
  for start in progress.bar(starts, total=len(starts), desc='queries', unit='batch', enabled=len(starts) > 1):
    chunk = slice(start, start + BATCH)
    decoded = [_query_input(attributor, i, as_path(queries), n) for i, n in zip(images[chunk], lines[chunk])]
    answers = attributor.attribute_batch(decoded, prompts[chunk], k=k, among=among)
    for offset, (image, prompt, line, result) in enumerate(zip(images[chunk], prompts[chunk], lines[chunk], answers)):
      number = start + offset + 1
      grid = None
      if grid_dir is not None:
        grid = grid_dir / f'{number:05d}_{PurePosixPath(image).stem}.png'  # in list order, named by the query
        unreadable += draw_answer(attributor, decoded[offset], prompt, result, grid, full_scale)
      records.append({'query': number, 'line': line, 'image': image, 'prompt': prompt,
                      'ids': result.ids.tolist(), 'scores': result.scores.tolist(), 'captions': result.captions,
                      'paths': result.paths, 'grid': None if grid is None else str(grid)})
  results = out_dir / 'results.jsonl'
  write_bytes_atomic(results, ''.join(json.dumps(r) + '\n' for r in records).encode())
  return {'job': 'attrib query', 'queries': len(records), 'list': str(queries), 'k': k,
          'among': None if among is None else len(among), 'results': str(results),
          'grids': None if grid_dir is None else str(grid_dir), 'first': records[0],
          'unreadable_train_images': sorted(set(unreadable)), 'versions': versions()}
