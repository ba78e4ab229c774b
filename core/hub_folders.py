"""Where a downloaded checkpoint's files are, for the message when a command is given the folder
above them. Two mistakes are common: `huggingface-cli download REPO` without --local-dir leaves the
files in the Hub cache (`models--ORG--NAME/snapshots/<revision>/`), and a diffusers pipeline
(`model_index.json`, as amused/amused-256) keeps each model in a subfolder (`vqvae/`, `unet/`)."""
from __future__ import annotations

from pathlib import Path


def where_the_files_are(folder, subfolder: str | None = None) -> str:
  """'; <what the folder is>: give <the folder that holds the files>', or '' when it is neither a
  Hub cache folder nor a pipeline with `subfolder`. `subfolder`: the pipeline part the command reads."""
  folder = Path(folder)
  snapshots = sorted((folder / 'snapshots').glob('*/'), key=lambda p: p.stat().st_mtime) \
      if (folder / 'snapshots').is_dir() else []
  if snapshots:
    target = snapshots[-1] / subfolder if subfolder and (snapshots[-1] / subfolder).is_dir() else snapshots[-1]
    return f'; {folder} is a Hugging Face Hub cache folder: give its snapshot, {target}'
  if subfolder and (folder / 'model_index.json').is_file() and (folder / subfolder / 'config.json').is_file():
    return f'; {folder} is a diffusers pipeline: give its {subfolder}/ folder, {folder / subfolder}'
  return ''
