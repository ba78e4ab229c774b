"""Where a downloaded checkpoint's files are, for the message when a command is given the folder
above them. Two mistakes are common: `huggingface-cli download REPO` without --local-dir leaves the
files in the Hub cache (`models--ORG--NAME/snapshots/<revision>/`), and a diffusers pipeline
(`model_index.json`, as amused/amused-256) keeps each model in a subfolder (`vqvae/`, `unet/`).
A third: a Hub id (`facebook/dino-vitb16`) given as transformers' from_pretrained takes it, where a
local folder is read (nothing is downloaded at run time)."""
from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')  # ORG/NAME
_FILE_SUFFIXES = {'.bin', '.safetensors', '.pt', '.pth', '.ckpt', '.json', '.pkl', '.npy', '.npz'}  # a file, not a repo


def where_the_files_are(folder, subfolder: str | None = None) -> str:
  """'; <what the folder is>: give <the folder that holds the files>', or '' when it is neither a
  Hub cache folder nor a pipeline with `subfolder`. `subfolder`: the pipeline part the command reads."""
  if not Path(folder).exists() and _HUB_ID.fullmatch(str(folder)) and Path(folder).suffix not in _FILE_SUFFIXES:
    return (f'; {folder} looks like a Hugging Face Hub id, and nothing is downloaded at run time: download it '
            f'first (huggingface-cli download {folder} --local-dir DIR) and give that folder'
            + (f' (its {subfolder}/ for a diffusers pipeline)' if subfolder else ''))
  folder = Path(folder)
  snapshots = sorted((folder / 'snapshots').glob('*/'), key=lambda p: p.stat().st_mtime) \
      if (folder / 'snapshots').is_dir() else []
  if snapshots:
    target = snapshots[-1] / subfolder if subfolder and (snapshots[-1] / subfolder).is_dir() else snapshots[-1]
    return f'; {folder} is a Hugging Face Hub cache folder: give its snapshot, {target}'
  if subfolder and (folder / 'model_index.json').is_file() and (folder / subfolder / 'config.json').is_file():
    return f'; {folder} is a diffusers pipeline: give its {subfolder}/ folder, {folder / subfolder}'
  return ''
