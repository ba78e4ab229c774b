"""FastGDA on MSCOCO as the paper trains it, on its released features and AbU+ rankings:

  python launch.py attrib distill --config attrib/configs/fastgda_coco.py --workdir runs/coco_student \
      --features data/coco/feats/dino+clip_text --ranks data/coco/influence_train.pkl
  python launch.py attrib eval --workdir runs/coco_student --ranks data/coco/influence_test.pkl
"""
from attrib.fastgda_config import FastGDAConfig


def get_config():
  return FastGDAConfig()  # the defaults are the paper's (fastgda.md §3, scripts/train_coco.sh)
