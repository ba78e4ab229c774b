"""The `launch.py attrib ...` commands: their flags, and which job each runs."""
from __future__ import annotations

from pathlib import Path

from core.distributed import add_process_flags
from core.fit_check import CHECK_HELP

ROOT = Path(__file__).resolve().parent.parent


def add_parser(sub) -> None:
  a = sub.add_parser('attrib', help='data attribution jobs').add_subparsers(dest='command', required=True)
  am = a.add_parser('train-model', help='train the text-to-image diffusion model')
  am.add_argument('--config', help='the run\'s config file (a rerun of a workdir may leave it out: it continues with the config the workdir recorded, plus any --set)')
  am.add_argument('--tpu', help='slice preset (default: a rerun\'s, else tpu_configs/cpu_8.py)')
  am.add_argument('--workdir', help='run directory (local or gs://); not needed with --check')
  am.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  am.add_argument('--check', action='store_true', help=CHECK_HELP)
  add_process_flags(am)

  ai = a.add_parser('import-diffusers', help='a diffusers UNet2DConditionModel state dict -> workdir (MSCOCO model)')
  ai.add_argument('--weights', required=True, help='model.bin (torch pickle), .safetensors, or a diffusers UNet folder (its weights file)')
  ai.add_argument('--config', default=str(ROOT / 'attrib/configs/mscoco.py'))
  ai.add_argument('--tpu', default=str(ROOT / 'tpu_configs/cpu_1.py'))
  ai.add_argument('--workdir', required=True)
  ai.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')

  at = a.add_parser('teacher', help='AbU teacher: rank training images for generated queries')
  at.add_argument('--workdir', required=True, help='a workdir from attrib train-model or import-diffusers')
  at.add_argument('--queries', type=int, required=True)
  at.add_argument('--candidates', default='all', help="top-M candidates by base features, or 'all'")
  at.add_argument('--query-dir', help='precomputed query latents.npy + text_embeddings.npy (imported models)')
  at.add_argument('--neighbours', help='.npy [queries, >=M] training ids: the candidates of each query')
  at.add_argument('--split', default='test', choices=['test', 'train'],
                  help='test: evaluation queries (teacher/); train: the student\'s queries (teacher_train/), '
                       'from prompts kept apart from the test ones')
  at.add_argument('--tpu', help='slice preset (default: the one the model trained with)')
  at.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='TeacherConfig fields')
  add_process_flags(at)

  af = a.add_parser('features', help='base features of the training set and the queries (FastGDA layout)')
  af.add_argument('--workdir', required=True)
  af.add_argument('--feature', action='append', help="feature name(s), e.g. 'unet+text' (default: the config's)")
  af.add_argument('--config', default=str(ROOT / 'attrib/configs/fastgda_digits.py'))
  af.add_argument('--dino', help='facebook/dino-vitb16 checkpoint dir (full-scale features)')
  af.add_argument('--clip', help='openai/clip-vit-base-patch32 checkpoint dir (full-scale features)')
  af.add_argument('--train-list', help='TSV `image<TAB>caption` of the training images (full scale)')
  af.add_argument('--train-queries-list', help='TSV `image<TAB>prompt` of the training queries')
  af.add_argument('--test-queries-list', help='TSV `image<TAB>prompt` of the test queries')
  af.add_argument('--tpu', default=str(ROOT / 'tpu_configs/cpu_1.py'))
  af.add_argument('--rows-per-part', type=int, default=8192,
                  help='full scale: rows written per resumable part (a failure loses at most one part)')
  add_process_flags(af)  # full scale: each host featurizes parts of its own

  ad = a.add_parser('distill', help='train the FastGDA embedder on the teacher rankings; embed and index')
  ad.add_argument('--workdir', required=True)
  ad.add_argument('--config', help='default: attrib/configs/fastgda_digits.py; a rerun\'s recorded one')
  ad.add_argument('--tpu', help='slice preset (default: cpu_1; a rerun\'s recorded one)')
  ad.add_argument('--features', help="directory of data_feats.npy / train_query_feats.npy (FastGDA's feats/<ftype>; "
                  "default: the workdir's features/<config.feature>; a rerun's recorded one)")
  ad.add_argument('--ranks', help='training-query ranks: influence_train.pkl, .npy [Q, M] or ranks.arrayrecord '
                  "(default: the workdir's teacher_train/; a rerun's recorded one)")
  ad.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  add_process_flags(ad)

  ax = a.add_parser('index', help='(re)build the ScaNN index of the embedded training set')
  ax.add_argument('--workdir', required=True)
  ax.add_argument('--shards', type=int, default=1)
  ax.add_argument('--set', action='append', default=[], metavar='index.KEY=VALUE',
                  help='index settings (kept from the index there, else the distill config): e.g. '
                       'index.kind=tree_ah index.leaves_to_search=64 index.reorder=200')

  aa = a.add_parser('add', help='add training images to a distilled student\'s index, without distilling again')
  aa.add_argument('--workdir', required=True)
  aa.add_argument('--images', help='TSV of image path<TAB>caption lines (relative paths: from the TSV\'s folder)')
  aa.add_argument('--features', help='.npy of φ rows [n, d], for a student distilled on precomputed features')
  aa.add_argument('--dino', help='full scale: the DINO checkpoint the student\'s features came from')
  aa.add_argument('--clip', help='full scale: the CLIP checkpoint the student\'s features came from')
  aa.add_argument('--train-list', help='full scale: the training TSV the student was distilled over')
  aa.add_argument('--allow-repeats', action='store_true',
                  help='add images added before (same image and caption) again, as more training images; '
                       'without it a rerun of the same list adds nothing and a list repeating some is refused')
  # No towers to load: a removal names training ids, it computes no feature.
  ar = a.add_parser('remove', help='take training images out of every answer of a distilled student (a takedown)')
  ar.add_argument('--workdir', required=True)
  ar.add_argument('--ids', help='training ids, comma-separated: 3,17,250')
  ar.add_argument('--ids-file', help='a file of training ids, comma or newline separated')

  ae = a.add_parser('eval', help='mAP of base features and the student against the teacher; latency')
  ae.add_argument('--workdir', required=True)
  ae.add_argument('--features', help='features directory (default: the one the student trained on)')
  ae.add_argument('--ranks', help='test-query ranks: influence_test.pkl, .npy or ranks.arrayrecord')

  aq = a.add_parser('query', help='attribute one image (top-k training images as a PNG grid), or a list of them')
  aq.add_argument('--workdir', required=True)
  aq.add_argument('--image', help='the generated image (with --prompt)')
  aq.add_argument('--prompt', help='the prompt it was generated from')
  aq.add_argument('--queries', help='instead of --image/--prompt: a TSV of image path<TAB>prompt lines, '
                  'answered into OUT/results.jsonl')
  aq.add_argument('-k', type=int, help='training images per answer (default 10, or fewer when --among lists fewer)')
  aq.add_argument('--out', help='PNG path (default WORKDIR/query.png); with --queries a folder '
                  '(default WORKDIR/query_results)')
  aq.add_argument('--grids', action='store_true', help='with --queries: a PNG grid per query in OUT/grids/')
  aq.add_argument('--dino', help='full scale: the DINO checkpoint the student\'s features came from')
  aq.add_argument('--clip', help='full scale: the CLIP checkpoint the student\'s features came from')
  aq.add_argument('--train-list', help='full scale: the training TSV (image<TAB>caption) for captions and the grid')
  aq.add_argument('--among', help='answer among these training ids only, comma-separated: 3,17,250 '
                  '(an artist\'s works, a licensed collection)')
  aq.add_argument('--among-file', help='as --among, the ids in a file (comma or newline separated), or, with '
                  '--train-list, training image files (one per line, as the list names them)')

  asv = a.add_parser('serve', help='answer attribution queries over HTTP (POST /attribute, GET /health)')
  asv.add_argument('--workdir', required=True)
  asv.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1, this machine only; '
                   '0.0.0.0 for every interface: with --token-file and --tls-cert/--tls-key, or behind a proxy)')
  asv.add_argument('--token-file', help='ask each query for "Authorization: Bearer <the first line of this file>" '
                   '(default: $ATTRIB_SERVE_TOKEN if set, else no token)')
  asv.add_argument('--tls-cert', help='serve HTTPS with this certificate chain (PEM), with --tls-key')
  asv.add_argument('--tls-key', help='the private key (PEM) of --tls-cert')
  asv.add_argument('--port', type=int, default=8000, help='default 8000; 0 picks a free one (printed)')
  asv.add_argument('--dino', help='full scale: the DINO checkpoint the student\'s features came from')
  asv.add_argument('--clip', help='full scale: the CLIP checkpoint the student\'s features came from')
  asv.add_argument('--train-list', help='full scale: the training TSV (image<TAB>caption), for captions and paths')
  asv.add_argument('--reload-every', type=float, default=2.0, metavar='SECONDS',
                   help='look this often whether the student\'s files changed (attrib add, remove, index) and '
                   'reload it when they did (default 2; 0: never)')

  ag = a.add_parser('generate', help='an image from a trained digits model for a prompt and seed (a query to attribute)')
  ag.add_argument('--workdir', required=True, help='a workdir from attrib train-model')
  ag.add_argument('--prompt', required=True, help='e.g. "a handwritten seven" (the teacher\'s test prompts: '
                  'WORKDIR/teacher/queries.npz)')
  ag.add_argument('--seed', type=int, help='noise seed (default 0); the teacher\'s test query q used seed q')
  ag.add_argument('--seeds', help='many images: seeds such as 0-99 or 0,3,7, written into the --out folder '
                  '(default WORKDIR/generated) with a queries.tsv for attrib query --queries')
  ag.add_argument('--out', help='picture at the model\'s size (default WORKDIR/generated.png; PNG keeps its '
                  'pixels exactly, JPEG does not); with --seeds a folder')
  ag.add_argument('--tpu', help='slice preset (default: the one the model trained with)')

  ac = a.add_parser('counterfactual', help='retrain without the teacher top-K vs random K; compare query loss')
  ac.add_argument('--workdir', required=True)
  ac.add_argument('--k', type=int, required=True)
  ac.add_argument('--queries', type=int, default=3)
  ac.add_argument('--seeds', type=int, default=2)
  ac.add_argument('--steps', type=int, default=400, help='training steps of every retrained model')
  ac.add_argument('--tpu')
  ac.add_argument('--ranking', default='teacher',
                  help="comma-separated rankings whose top K are removed: teacher, student, or a base feature name")


def run(args) -> dict:
  if args.command == 'train-model':
    from attrib import commands as attrib_commands
    result = attrib_commands.train_model_command(args.config, args.tpu, args.workdir, args.set)
  elif args.command == 'import-diffusers':
    from attrib.released import import_diffusers_command
    result = import_diffusers_command(args.weights, args.config, args.tpu, args.workdir, args.set)
  elif args.command == 'features':
    from attrib.features import features_command
    from core.config import load_config_file
    names = args.feature or [load_config_file(args.config).feature, *load_config_file(args.config).compare_features]
    if args.dino or args.clip:
      from attrib.tower_features import tower_features_command
      lists = {'train': args.train_list, 'train_queries': args.train_queries_list,
               'test_queries': args.test_queries_list}
      result = tower_features_command(args.workdir, list(dict.fromkeys(names)), args.dino, args.clip, lists, args.tpu,
                                      args.rows_per_part)
    else:
      import jax
      if jax.process_count() > 1:
        from core.errors import ConfigError
        raise ConfigError('the built-in digits features run on one process; several hosts are for the '
                          'full-scale towers (--dino / --clip)')
      result = features_command(args.workdir, list(dict.fromkeys(names)))
  elif args.command == 'distill':
    from attrib.distill import distill_command
    result = distill_command(args.workdir, args.config, args.tpu, args.set, args.features, args.ranks)
  elif args.command == 'index':
    from attrib.distill import rebuild_index_command
    result = rebuild_index_command(args.workdir, args.shards, args.set)
  elif args.command == 'add':
    from attrib.additions import add_command
    result = add_command(args.workdir, args.images, args.features, args.dino, args.clip, args.train_list,
                         args.allow_repeats)
  elif args.command == 'remove':
    from attrib.removals import remove_command
    result = remove_command(args.workdir, args.ids, args.ids_file)
  elif args.command == 'eval':
    from attrib.evaluation import eval_command
    result = eval_command(args.workdir, args.features, args.ranks)
  elif args.command == 'query':
    from attrib.removals import ids_from_flags
    from core.errors import ConfigError
    if args.among is not None and args.among_file is not None:
      raise ConfigError('--among and --among-file exclude each other: give the ids inline or in a file')
    among = ids_from_flags(args.among, None, '--among')  # an --among-file is read once the student is loaded
    if args.queries:
      if args.image is not None or args.prompt is not None:
        raise ConfigError('--queries lists the images and their prompts: give it without --image and --prompt')
      from attrib.batch_query import batch_query_command
      result = batch_query_command(args.workdir, args.queries, args.k, args.out, args.grids, args.dino, args.clip,
                                   args.train_list, among, args.among_file)
    else:
      if args.image is None or args.prompt is None:
        raise ConfigError('attrib query needs --image and --prompt (or --queries LIST.tsv for many)')
      if args.grids:
        raise ConfigError('--grids is for --queries; one query always gets its grid (--out)')
      from attrib.query import query_command
      result = query_command(args.workdir, args.image, args.prompt, args.k, args.out, args.dino, args.clip,
                             args.train_list, among, args.among_file)
  elif args.command == 'serve':
    from attrib.serve import serve_command
    result = serve_command(args.workdir, args.host, args.port, args.dino, args.clip, args.train_list,
                           args.reload_every, args.token_file, args.tls_cert, args.tls_key)
  elif args.command == 'generate':
    if args.seeds is not None:
      if args.seed is not None:
        from core.errors import ConfigError
        raise ConfigError('--seed and --seeds exclude each other (--seeds 3 is one seed)')
      from attrib.generation import generate_seeds_command
      result = generate_seeds_command(args.workdir, args.prompt, args.seeds, args.out, args.tpu)
    else:
      from attrib.generation import generate_command
      result = generate_command(args.workdir, args.prompt, 0 if args.seed is None else args.seed, args.out,
                                args.tpu)
  elif args.command == 'counterfactual':
    from attrib.counterfactual import counterfactual_command
    result = counterfactual_command(args.workdir, args.k, args.queries, args.seeds, args.steps, args.tpu,
                                    tuple(r.strip() for r in args.ranking.split(',') if r.strip()))
  else:
    from attrib import curation
    result = curation.teacher_command(args.workdir, args.queries, args.candidates, args.tpu, args.set,
                                      query_dir=args.query_dir, neighbours=args.neighbours, split=args.split)
  return result
