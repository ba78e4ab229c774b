"""The `launch.py lvm ...` commands: their flags, and which job each runs."""
from __future__ import annotations

from pathlib import Path

from core.distributed import add_process_flags
from core.fit_check import CHECK_HELP

ROOT = Path(__file__).resolve().parent.parent


def add_parser(sub) -> None:
  lvm = sub.add_parser('lvm', help='Large Vision Model jobs').add_subparsers(dest='command', required=True)
  t = lvm.add_parser('train', help='train (or continue training) a decoder')
  t.add_argument('--config', help='the run\'s config file, e.g. lvm/configs/tiny.py (a rerun of a workdir may leave '
                 'it out: it continues with the config the workdir recorded, plus any --set)')
  t.add_argument('--tpu', help='slice preset file in tpu_configs/ (a rerun continues with the one it trained with)')
  t.add_argument('--workdir', help='run directory (local or gs://); not needed with --check')
  t.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  t.add_argument('--check', action='store_true', help=CHECK_HELP)
  add_process_flags(t)
  e = lvm.add_parser('eval', help='perplexity of a trained workdir on token data')
  e.add_argument('--workdir', required=True)
  e.add_argument('--data', required=True, help='shard dir, .arrayrecord, .jsonl, .npy or builtin:digits-eval')
  e.add_argument('--tpu', help='slice preset (default: the one the run trained with)')
  e.add_argument('--target-tokens', type=int, help='trailing tokens scored (default: last image, 256)')
  e.add_argument('--batch-size', type=int, default=8)
  e.add_argument('--completion', type=int, default=0, metavar='N',
                 help='also generate the last frame of the first N records of each kind (greedy, from the frames '
                      'before it): token accuracy and PSNR against the true frame, and against copying the last one')
  add_process_flags(e)
  i = lvm.add_parser('import-hf', help='LlamaForCausalLM safetensors dir -> workdir checkpoint')
  i.add_argument('--hf-dir', required=True, help='LlamaForCausalLM folder: config.json + safetensors (local or gs://)')
  i.add_argument('--workdir', required=True)
  i.add_argument('--tpu', help='slice preset to shard the imported weights for')
  i.add_argument('--seq-len', type=int, default=None,
                 help='record length the workdir will train on (default: the model\'s max_position_embeddings)')
  x = lvm.add_parser('export-hf', help='workdir checkpoint -> LlamaForCausalLM safetensors dir')
  x.add_argument('--workdir', required=True)
  x.add_argument('--out', required=True, help='folder for config.json + safetensors (local or gs://)')
  x.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])

  tt = lvm.add_parser('train-tokenizer', help='train a VQGAN image tokenizer')
  tt.add_argument('--config', help='the run\'s config file (a rerun of a workdir may leave it out: it continues with the config the workdir recorded, plus any --set)')
  tt.add_argument('--tpu', help='slice preset (default: a rerun\'s, else tpu_configs/cpu_1.py)')
  tt.add_argument('--workdir', help='run directory (local or gs://); not needed with --check')
  tt.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  tt.add_argument('--check', action='store_true', help=CHECK_HELP)
  add_process_flags(tt)
  ti = lvm.add_parser('import-tokenizer', help='released VQGAN (diffusers VQModel dir or open-muse weights) -> workdir')
  ti.add_argument('--weights', required=True, help='VQModel directory, or a weights file with config.json beside it')
  ti.add_argument('--workdir', required=True)
  ti.add_argument('--tpu', help='slice preset to shard the weights for (default: cpu_1)')
  tk = lvm.add_parser('tokenize', help='images -> visual sentences of tokens (ArrayRecord shards + manifest)')
  tk.add_argument('--tokenizer', required=True, help='a tokenizer workdir')
  tk.add_argument('--source', default='builtin:digits',
                  help='builtin:digits|photos|skimage (joined by +), tfds:NAME[:SPLIT], frames:DIR (one subfolder '
                       'of frames, or an animated GIF/WebP/PNG, per video) or an image folder (class subfolders give categories); folders local or gs://')
  tk.add_argument('--stride', type=int, default=1, help='frame stride of video clips')
  tk.add_argument('--labels', help='a folder of label pictures (segmentation masks, depth maps, ...) for a folder '
                  "source's images, at the same relative path and name with any image suffix: pairs sentences "
                  '[image, label] x n')
  tk.add_argument('--label-ids', action='store_true',
                  help='the labels hold class ids as grey levels or palette indexes: paint them in PASCAL VOC\'s '
                       'colours (ids 0-150 look black to a tokenizer otherwise)')
  tk.add_argument('--kind', action='append', help='sentence kind(s), repeated or comma-separated; default: '
                  'every kind the source supports')
  tk.add_argument('--out', required=True)
  tk.add_argument('--frames', type=int, default=4, help='images per visual sentence')
  tk.add_argument('--sentences', type=int, default=2048,
                  help='sentences per kind (each draws its images at random: size it to the source)')
  tk.add_argument('--kind-sentences', action='append', default=[], metavar='KIND=N',
                  help='sentences of one kind, overriding --sentences (e.g. video=4096)')
  tk.add_argument('--records-per-shard', type=int, default=512)
  tk.add_argument('--strict', action='store_true', help='fail on an unreadable image instead of skipping it')
  tk.add_argument('--stream', default='auto', choices=['auto', 'always', 'never'],
                  help='decode a folder or tfds split as sentences draw its images, not all into memory first '
                       '(auto: when it would take over a quarter of the free memory)')
  tk.add_argument('--read-threads', type=int, default=8, help='threads decoding a streamed source\'s images')
  tk.add_argument('--seed', type=int, default=0)
  tk.add_argument('--split', default='all', choices=['all', 'train', 'eval'],
                  help='images used: eval = the last 10%% of each class (for frames:, the last 10%% of the '
                       'videos, whole), train = the rest (no image in both)')
  tk.add_argument('--tpu')
  tk.add_argument('--beam', action='store_true',
                  help="run as an Apache Beam pipeline (the beam extra); shards are written by Beam's workers")
  tk.add_argument('--beam-options', default='', metavar='"--runner=... ..."',
                  help='Beam pipeline options, e.g. "--runner=DataflowRunner --project=P ..." (lvm/beam_tokenize.py)')
  add_process_flags(tk)  # several hosts: each writes shards of its own

  mg = lvm.add_parser('merge-sentences', help='one training set from several lvm tokenize folders (videos, pairs, '
                                              'images: sentences of one tokenizer and length)')
  mg.add_argument('--inputs', nargs='+', required=True, help='sentence folders (lvm tokenize --out), two or more')
  mg.add_argument('--out', required=True, help='a new folder: the inputs\' shards, linked, and one manifest')
  mg.add_argument('--weights', nargs='+', type=float, metavar='W',
                  help='one per input: its share of every training epoch (e.g. 3 1 1: the first input 60%%); '
                       'default: each record once an epoch')
  sh = lvm.add_parser('show', help='visual sentences decoded into a PNG grid, one row per record: look at the data')
  sh.add_argument('--data', required=True, help='a folder of token shards (`lvm tokenize --out`), local or gs://')
  sh.add_argument('--kind', help="only records of this kind (the manifest's shards of it)")
  sh.add_argument('--records', help='positions among them, e.g. 0-7 or 3,9,40 (default: the first 8)')
  sh.add_argument('--tokenizer', help='tokenizer workdir (default: the one the manifest names)')
  sh.add_argument('--out', help='PNG path (default DATA/sentences.png)')
  sh.add_argument('--tpu')

  g = lvm.add_parser('generate', help='prompt a trained LVM with images; writes a PNG grid (prompt | generation)')
  g.add_argument('--workdir', required=True)
  prompt = g.add_mutually_exclusive_group(required=True)
  prompt.add_argument('--prompt', nargs='+',
                      help='prompt images, in order; a folder stands for its images in frame order (frame2 before '
                           'frame10), an animated GIF, WebP or PNG for its frames')
  prompt.add_argument('--prompts', metavar='LIST',
                      help='many prompts, one per line of LIST (its images as --prompt takes them), answered in '
                           'batches into OUT/ (lvm/batch_prompting.py)')
  g.add_argument('--frames', type=int, default=1, help='frames to generate (sequence mode)')
  g.add_argument('--mode', default='sequence', choices=['sequence', 'analogy', 'in-context'])
  g.add_argument('--out', help='PNG path (default WORKDIR/generation.png); with --prompts a folder '
                               '(default WORKDIR/generations)')
  g.add_argument('--grids', action='store_true', help='with --prompts: a PNG grid per prompt in OUT/grids/')
  g.add_argument('--batch-size', type=int, help='with --prompts: prompts generated together (default 16)')
  g.add_argument('--tokenizer', help='tokenizer workdir (default: the one that made the training tokens)')
  g.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
  g.add_argument('--top-k', type=int, default=0)
  g.add_argument('--top-p', type=float, default=1.0)
  g.add_argument('--seed', type=int, default=0)
  g.add_argument('--samples', type=int, default=1, help='candidates of each prompt, sample i with seed + i, a grid '
                 'row each (needs --temperature > 0)')
  g.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'], help='weights and KV cache')
  g.add_argument('--tpu')


def run(args) -> dict:
  from lvm import commands
  if args.command == 'train':
    result = commands.train_command(args.config, args.tpu or commands.continued_preset(args.workdir), args.workdir,
                                    args.set)
  elif args.command == 'eval':
    result = commands.eval_command(args.workdir, args.data, args.tpu, args.target_tokens, args.batch_size,
                                   args.completion)
  elif args.command == 'import-hf':
    result = commands.import_hf_command(args.hf_dir, args.workdir, args.tpu, args.seq_len)
  elif args.command == 'train-tokenizer':
    from lvm.tokenizer_commands import train_tokenizer_command
    result = train_tokenizer_command(args.config, args.tpu, args.workdir, args.set)
  elif args.command == 'import-tokenizer':
    from lvm.tokenizer_commands import import_tokenizer_command
    result = import_tokenizer_command(args.weights, args.workdir, args.tpu)
  elif args.command == 'generate' and args.prompts:
    from lvm.batch_prompting import batch_generate_command
    result = batch_generate_command(args.workdir, args.prompts, args.frames, args.out, mode=args.mode,
                                    grids=args.grids, batch_size=16 if args.batch_size is None else args.batch_size,
                                    tokenizer_dir=args.tokenizer,
                                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed, dtype=args.dtype, tpu_path=args.tpu, samples=args.samples)
  elif args.command == 'generate':
    from core.config import ConfigError
    if args.grids or args.batch_size is not None:
      raise ConfigError('--grids and --batch-size are for --prompts LIST; one prompt always gets its grid (--out)')
    from lvm.prompting import generate_command
    result = generate_command(args.workdir, args.prompt, args.frames, args.out, mode=args.mode,
                              tokenizer_dir=args.tokenizer, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, dtype=args.dtype, tpu_path=args.tpu,
                              samples=args.samples)
    result = {k: v for k, v in result.items() if k != 'tokens'}  # the file has them; the screen does not need them
  elif args.command == 'tokenize':
    from lvm.sentences import tokenize_command
    from core.config import parse_counts
    # --kind a,b as --kind a --kind b; a kind named twice is built once
    kinds = list(dict.fromkeys(k.strip() for item in args.kind for k in item.split(','))) if args.kind else None
    options = dict(frames=args.frames, kind_sentences=parse_counts(args.kind_sentences, '--kind-sentences'),
                   sentences=args.sentences, records_per_shard=args.records_per_shard, strict=args.strict,
                   seed=args.seed, split=args.split, stride=args.stride, tpu_path=args.tpu, labels=args.labels,
                   label_ids=args.label_ids, stream=args.stream, read_threads=args.read_threads)
    if args.beam:
      import jax
      if jax.process_count() > 1:
        from core.errors import ConfigError
        raise ConfigError('--beam runs on one process (Beam brings its own workers: --beam-options); '
                          'without --beam the hosts of a slice each write shards of their own')
      from lvm.beam_tokenize import beam_tokenize_command
      result = beam_tokenize_command(args.tokenizer, args.source, kinds, args.out,
                                     beam_options=args.beam_options, **options)
    elif args.beam_options:
      from core.errors import ConfigError
      raise ConfigError("--beam-options without --beam")
    else:
      result = tokenize_command(args.tokenizer, args.source, kinds, args.out, **options)
  elif args.command == 'merge-sentences':
    from lvm.merge_sentences import merge_sentences_command
    result = merge_sentences_command(args.inputs, args.out, args.weights)
  elif args.command == 'show':
    from lvm.show_sentences import show_command
    result = show_command(args.data, args.out, args.kind, args.records, args.tokenizer, args.tpu)
  else:
    result = commands.export_hf_command(args.workdir, args.out, args.dtype)
  return result
