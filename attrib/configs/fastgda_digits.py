"""FastGDA on the built-in digits (1600 training images): sizes for a CPU in minutes.

Queries: 160 training queries x their top 100 candidates by the base feature (16,000 ranks; 16 held
out for validation), 16 test queries ranked over all 1600 images; teacher scoring over 10 timesteps.
mAP(L) at L = 16, 48, 160 (1%, 3%, 10% of the training set; COCO's 500-4000 are 0.4-3.4%).
"""
from attrib.embedder import EmbedderConfig
from attrib.fastgda_config import DistillConfig, FastGDAConfig, TeacherDataConfig
from attrib.index import IndexConfig


def get_config():
  return FastGDAConfig(
      feature='unet+text',
      compare_features=('pixels', 'unet', 'text', 'pixels+text'),
      map_at=(16, 48, 160),
      teacher_data=TeacherDataConfig(train_queries=160, test_queries=16, candidates=100, test_candidates=0,
                                     timestep_stride=100),
      embedder=EmbedderConfig(hidden=(256, 256, 256), output_dim=256),
      distill=DistillConfig(batch=1024, epochs=60, val_queries=16, log_every=20),
      index=IndexConfig(recall_probes=200),
  )
