"""`lvm tokenize --beam`: the tokenize job as an Apache Beam pipeline, for when one machine is not enough.

The same job as `lvm tokenize` (lvm/sentences.py), split at the shard: the driver checks the inputs
and claims the output directory (`plan_tokenize_job`), the pipeline fans the unfinished shards out
to workers, each worker loads the tokenizer and the source once (`DoFn.setup`) and writes whole
shards, and the driver writes the manifest once every shard exists. Sentence n of a kind is a pure
function of (seed, kind, n), so a shard is byte-identical whichever worker wrote it, and a rerun (or a
retried bundle) skips or rewrites whole shards: nothing is lost or duplicated.

Runners (`--beam-options`, Beam's own pipeline flags):
  DirectRunner (default)   this machine; `--direct_num_workers=N --direct_running_mode=multi_processing`
                           for N worker processes
  DataflowRunner           `--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp
                           --sdk_container_image=IMAGE` (an image with this package and its `beam`
                           extra installed), --out and the tokenizer on gs://; each worker reads the
                           source's images, so put the source on gs:// too (or bake it into the image)
  FlinkRunner              `--runner=FlinkRunner --flink_master=HOST:8081 --environment_type=DOCKER
                           --environment_config=IMAGE` (the same image)
Scale: the work per shard is `records_per_shard` sentences through the VQGAN encoder; workers scale
with the shard count. Visual sentences draw images from the whole source: a worker holds it in
memory when it fits, and streams it (each image decoded when a sentence draws it; `--stream`,
lvm/sentence_sources.py) when it does not, as the driver chose: a folder's file names are listed and
its headers read by every worker once, a tfds split's labels read once.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path

from lvm.sentences import ShardSpec, finish_tokenize_job, plan_tokenize_job, write_sentence_shard


def _beam():
  try:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError:
    from core.errors import ConfigError
    raise ConfigError("--beam needs Apache Beam: pip install -e '.[beam]'") from None
  return beam, PipelineOptions


def worker_preset(tokenizer_dir: str, tpu_path: str | None) -> str:
  """The slice preset a worker encodes with. A tokenizer's run config names the preset it trained
  with by its path on the training machine; a remote worker may not have that path, so it takes
  the preset of the same name from its own installed copy of tpu_configs (the same settings, so
  the same tokens: core.mesh.recorded_preset), or cpu_1 if there is none."""
  if tpu_path is not None:
    return tpu_path
  from core.mesh import PRESET_DIR
  from core.workdir import read_run_config
  from lvm.tokenizer_commands import MADE_BY
  from lvm.tokenizer_task import TokenizerRunConfig
  _, trained = read_run_config(tokenizer_dir, TokenizerRunConfig, MADE_BY)
  return trained if Path(trained).is_file() else str(PRESET_DIR / 'cpu_1.py')


def _shard_writer(beam, job_args: dict):

  class WriteShards(beam.DoFn):
    """Writes the shards it is given; loads the tokenizer and the images once per worker."""

    def setup(self):
      from core import progress
      args = dict(job_args, tpu_path=worker_preset(job_args['tokenizer_dir'], job_args.get('tpu_path')))
      with progress.quiet():  # its notes (unlabelled images, coverage) are the driver's, said once
        self.job = plan_tokenize_job(**args, claim=False)

    def process(self, shard: ShardSpec):
      if not (self.job.out / shard.name).exists():  # a retried bundle may find it done
        write_sentence_shard(self.job, shard)
      yield shard.name

  return WriteShards()


def beam_tokenize_command(tokenizer_dir: str, source: str, kinds: list[str] | None, out: str, *,
                          beam_options: str = '', **options) -> dict:
  """Checks and claims `out` here, writes the unfinished shards through Beam, then the manifest."""
  beam, PipelineOptions = _beam()
  started = time.time()
  job = plan_tokenize_job(tokenizer_dir, source, kinds, out, **options)
  todo = [shard for shard in job.shards if not (job.out / shard.name).exists()]
  # Workers rebuild the job from its arguments (they get strings and numbers, not arrays), for the
  # kinds the driver resolved.
  job_args = dict(options, tokenizer_dir=tokenizer_dir, source=source, kinds=job.spec['kinds'], out=str(job.out),
                  stream='always' if job.spec['source_images'].get('streamed') else 'never')
  if getattr(getattr(job.images, 'stream', None), 'scan', None) is not None:
    job_args['scanned'] = job.images.stream.scan.to_json()  # a streamed folder's headers: read here, not on each worker
  if todo:
    pipeline_options = PipelineOptions(shlex.split(beam_options))
    with beam.Pipeline(options=pipeline_options) as pipeline:
      (pipeline
       | 'shards' >> beam.Create(todo)
       | 'spread' >> beam.Reshuffle()  # one shard per element, balanced over workers
       | 'tokenize' >> beam.ParDo(_shard_writer(beam, job_args)))
  return finish_tokenize_job(job, len(todo), started, runner='beam: ' + (beam_options or 'DirectRunner'))
