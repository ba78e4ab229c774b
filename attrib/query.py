"""`launch.py attrib query`: attribute one generated image and draw the answer.

Writes OUT (a PNG: the query, then its top-k training images, ten to a row, with their predicted
rank fraction and caption) and WORKDIR/query_result.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from core.paths import as_path
from core.workdir import prepare_output_file, save_image_atomic, versions, write_result_if_writable


def _tile(image_hw: np.ndarray, scale: int):  # -> PIL.Image.Image
  from PIL import Image
  grey = ((np.clip(image_hw, -1, 1) + 1) * 127.5).round().astype(np.uint8)
  return Image.fromarray(grey).resize((grey.shape[1] * scale, grey.shape[0] * scale), Image.NEAREST)


# Results per row of a picture: one row of k = 1,000 was 100,000+ px wide, more than JPEG can hold
# (65,500) and than viewers show; the rows below the first leave the query's column empty.
PER_ROW = 10


def _canvas_size(k: int, cell: int, row_height: int) -> tuple[int, int]:
  return cell * (min(k, PER_ROW) + 1) + 12, row_height * -(-max(k, 1) // PER_ROW)


def _place(n: int, cell: int, row_height: int) -> tuple[int, int]:
  """(x, y) of the n-th result's cell (0-based): PER_ROW to a row, right of the query's column."""
  return 16 + cell * (n % PER_ROW + 1), row_height * (n // PER_ROW)


def draw_attribution(query_hw: np.ndarray, prompt: str, train_images: np.ndarray, result, path: Path,
                     scale: int = 6) -> None:
  """The query, a gap, then the top-k training images (PER_ROW to a row), each labelled with its score."""
  from PIL import Image, ImageDraw
  size = query_hw.shape[0] * scale
  cell, label = size + 8, 28
  row_height = cell + label + 16
  canvas = Image.new('L', _canvas_size(len(result.ids), cell, row_height), 255)
  draw = ImageDraw.Draw(canvas)
  canvas.paste(_tile(query_hw, scale), (4, 16))
  draw.text((4, 2), 'query', fill=0)
  draw.text((4, 16 + size + 2), prompt[:22], fill=0)
  for n, (i, s) in enumerate(zip(result.ids, result.scores)):
    x, y = _place(n, cell, row_height)
    canvas.paste(_tile(train_images[int(i)][..., 0], scale), (x, y + 16))
    draw.text((x, y + 2), f'#{n + 1} id {int(i)}', fill=0)
    draw.text((x, y + 16 + size + 2), f'{s:.3f}', fill=0)
  save_image_atomic(path, np.asarray(canvas))


def draw_photo_attribution(query, prompt: str, train_paths: list[str], result, path: Path,
                           side: int = 112) -> list[str]:
  """Full scale: the query photo, then its top-k training photos (centre squares), each with its score
  and the start of its caption. Returns the training image files that could not be read: each is drawn
  as a grey tile saying so (the answer stands; a moved or deleted file should not lose it)."""
  from PIL import Image, ImageDraw

  def tile(image):
    image = image.convert('RGB')
    w, h = image.size
    s = min(w, h)
    return image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((side, side))

  cell, row_height = side + 8, side + 52
  canvas = Image.new('RGB', _canvas_size(len(result.ids), cell, row_height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  canvas.paste(tile(query), (4, 16))
  draw.text((4, 2), 'query', fill=(0, 0, 0))
  draw.text((4, 16 + side + 2), prompt[:18], fill=(0, 0, 0))
  unreadable = []
  for n, (i, s) in enumerate(zip(result.ids, result.scores)):
    x, y = _place(n, cell, row_height)
    train_path, missing = train_paths[int(i)], None
    if train_path is None:  # a training image added as φ rows (features=): there is no file to draw
      missing = 'no file'
    else:
      try:
        with as_path(train_path).open('rb') as f:
          canvas.paste(tile(Image.open(f)), (x, y + 16))
      except (OSError, ValueError, Image.DecompressionBombError):
        unreadable.append(train_path)
        missing = 'unreadable file'
    if missing:
      draw.rectangle((x, y + 16, x + side - 1, y + 16 + side - 1), fill=(200, 200, 200))
      draw.text((x + 4, y + 16 + side // 2 - 6), missing, fill=(0, 0, 0))
    draw.text((x, y + 2), f'#{n + 1} id {int(i)}', fill=(0, 0, 0))
    draw.text((x, y + 16 + side + 2), f'{s:.3f}', fill=(0, 0, 0))
    if result.captions:
      draw.text((x, y + 16 + side + 16), result.captions[n][:18], fill=(0, 0, 0))
  save_image_atomic(path, np.asarray(canvas))
  return unreadable


def draw_answer(attributor, image, prompt: str, result, out_path: Path, full_scale: bool) -> list[str]:
  """The grid of one answer (the query, then its top-k training images); returns the training image
  files that could not be read (drawn as grey tiles and warned about)."""
  from attrib.query_images import digit_pixels, tower_image
  if full_scale:
    unreadable = draw_photo_attribution(tower_image(image), prompt, attributor.train_images, result, out_path)
    for file in unreadable:
      print(f'warning: {file}: training image not readable; drawn as a grey tile in {out_path}', file=sys.stderr)
    return unreadable
  draw_attribution(digit_pixels(image)[..., 0], prompt, attributor.train_images, result, out_path)
  return []


def query_command(workdir: str, image: str, prompt: str, k: int | None, out: str | None, dino: str | None = None,
                  clip: str | None = None, train_list: str | None = None, among: list[int] | None = None,
                  among_file: str | None = None) -> dict:
  from attrib.attributor import Attributor
  attributor = Attributor.load(workdir, dino=dino, clip=clip, train_list=train_list)
  if among_file is not None:
    from attrib.among import among_from_file
    among = among_from_file(among_file, attributor)
  k, _ = attributor.checked_request(k, among)  # before the grid's folder is made
  out_path = prepare_output_file(out) if out else prepare_output_file(as_path(workdir) / 'query.png', 'the default --out')
  result = attributor.attribute(image=image, prompt=prompt, k=k, among=among)
  unreadable = []
  if attributor.train_images is not None:
    unreadable = draw_answer(attributor, image, prompt, result, out_path, full_scale=bool(dino or clip))
  summary = {'job': 'attrib query', 'image': str(image), 'prompt': prompt, 'k': k,
             'among': None if among is None else len(among),
             'ids': result.ids.tolist(), 'scores': result.scores.tolist(), 'captions': result.captions,
             'paths': result.paths,
             'grid': str(out_path) if attributor.train_images is not None else None,
             'unreadable_train_images': unreadable, 'versions': versions()}
  write_result_if_writable(as_path(workdir) / 'query_result.json', summary)
  return summary
