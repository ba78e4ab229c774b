"""The attribution API: which training images made this generated image?

  from attrib import Attributor
  attributor = Attributor.load('runs/digits')
  result = attributor.attribute(image=generated, prompt='a handwritten seven', k=10)
  result.ids, result.scores, result.captions      # most influential first

Inside: the base feature φ of (image, prompt), the distilled embedding g(φ) (jitted), and a ScaNN
search over the embedded training set (each row with its per-image term c(z) as one more coordinate,
when the student has one), or, with `rerank_candidates` M in the student's config, a
ScaNN search over φ for its top M, which the student then orders. Scores are the student's
predicted rank fraction sigmoid(a·cos + b [+ c(z)]) ∈ (0, 1): 0 = the teacher's most influential image, 1 =
its least (ascending within the M when reranking; past them φ's order rules).

`among=ids` answers among those training images only (an artist's works, a licensed collection:
attrib/among.py). New training images join with `add_training_images`, and `remove_training_images`
takes images out of every answer (a takedown); `save` keeps both in the workdir (attrib/additions.py,
attrib/removals.py).
Thread-safe: queries share a readers-writer lock's read side, a change takes its write side, so a
query never sees half of one.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from attrib.additions import Additions, empty_additions, new_training_images
from attrib.among import among_ids, search_among
from attrib.embedder import cosine_from_dots, index_queries, index_rows, unit_rows
from attrib.features import DIGIT_PARTS
from attrib.index import IndexFileError, load_any
from attrib.query_images import AttributionError, digit_pixels, tower_image
from attrib.removals import checked_ids, first_kept, read_removed, write_removed
from attrib.tower_features import TowerFeaturizer
from core.paths import as_path, is_remote
from core.readers_writer import ReadersWriterLock
from core.workdir import load_npy


def rerank_by_student(ids_qk: np.ndarray, student_key_qk: np.ndarray, m: int) -> np.ndarray:
  """Column order per row: the first `m` columns (the base feature's top m) sorted by descending
  student key (stable: ties keep φ's order), then the remaining columns as they were."""
  m = min(m, ids_qk.shape[1])
  head = np.argsort(-student_key_qk[:, :m], axis=1, kind='stable')
  tail = np.broadcast_to(np.arange(m, ids_qk.shape[1]), (len(ids_qk), ids_qk.shape[1] - m))
  return np.concatenate([head, tail], axis=1)


def student_key(scale: float, cosine: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
  """Higher = more influential: −(a·cos + c(z)), the student's logit without its constant b. Without
  a per-image prior, sign(−a)·cos orders the same and is what students before the prior used."""
  if prior is None:
    return (1.0 if scale < 0 else -1.0) * cosine
  return -(scale * cosine + prior)


def refuse_non_finite(features: np.ndarray) -> None:
  if not np.all(np.isfinite(features)):
    rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    raise AttributionError(f'features rows {rows[:5].tolist()} hold NaN or infinity')


def student_files_state(student) -> tuple:
  """What tells whether another process changed the student folder since it was looked at. Local:
  every top-level entry as (name, inode, size, modification time): a save replaces the files it writes
  (new inodes), a distill rewrites them all. gs://: every object under it as (name, size, generation):
  an object rewritten gets a new generation, even with the same bytes (one listing request)."""
  if is_remote(student):
    return _bucket_objects_state(str(student))
  entries = []
  for entry in sorted(Path(student).iterdir()):
    stat = entry.stat()
    entries.append((entry.name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
  return tuple(entries)


def _bucket_objects_state(url: str) -> tuple:
  import fsspec
  filesystem = fsspec.filesystem('gs')
  prefix = url.rstrip('/')
  filesystem.invalidate_cache(prefix)  # gcsfs keeps listings: another machine's save would go unseen
  objects = filesystem.find(prefix, detail=True)
  return tuple((name[len(prefix.split('://', 1)[-1]):], info.get('size'),
                info.get('generation') or info.get('updated') or info.get('md5Hash'))
               for name, info in sorted(objects.items()))


@dataclasses.dataclass(frozen=True)
class Attribution:
  ids: np.ndarray               # training ids, most influential first
  scores: np.ndarray            # predicted rank fraction in (0, 1), ascending
  cosine: np.ndarray            # cosine of query and training embeddings
  captions: list[str] | None    # captions of those training images, when the training set has them
  paths: list[str] | None = None  # their image files, when the training set is a list of files (train_list)


# A long batch is answered this many queries at a time: its decoded images, features and candidates'
# embeddings ([queries, M, d] when reranking) would otherwise all be held at once (6,400 digits
# queries in one call took 0.55 GB more; 100,000 full-scale photos would not fit).
QUERIES_AT_ONCE = 512


class Attributor:

  def __init__(self, workdir, graphdef, params, index, featurizer, captions, images, rerank=None, prior=None):
    self.workdir, self.index, self.featurizer = workdir, index, featurizer
    # (index over unit φ, unit student embeddings of the training set, M) or None.
    self.rerank = rerank
    self.prior = prior  # c(z) per training image (EmbedderConfig.image_prior) or None
    self.captions, self.train_images = captions, images
    model = nnx.merge(graphdef, params)
    self.scale, self.offset = float(params['scale']), float(params['offset'])
    # The most influential image has the lowest logit a·cos + b (+ c(z)): embedder.index_queries turns
    # that into a maximum inner product whatever the sign of a.
    self._embed = jax.jit(lambda x: unit_rows(model(x)))
    self.input_dim = int(params['layers'][0]['kernel'].shape[0])
    output_dim = int(params['layers'][len(params['layers']) - 1]['kernel'].shape[1])
    row_dim = output_dim + (prior is not None)  # with a per-image term, −c(z) is one more coordinate
    self._prior_of = jax.jit(lambda x: model.embed_and_prior(x)[1])  # c(z) of new training images
    self._lock = ReadersWriterLock()
    self.distilled_rows = len(index)  # the training set's N; `load` sets it and the additions after it
    self.additions: Additions = empty_additions(self.input_dim, isinstance(images, np.ndarray), isinstance(images, list))
    self._unsaved_embeddings = np.zeros((0, output_dim), np.float32)
    # student/embeddings.npy, memory-mapped when `among` first needs it (a reranking student holds its
    # embeddings in `rerank`); dropped when a save rewrites the file.
    self._saved_embeddings, self._embeddings_lock = None, threading.Lock()
    self.removed = np.zeros(0, np.int64)  # training ids never answered (sorted); `load` reads the saved ones
    self._removals_unsaved = False
    self._files_at_load = None  # `load` records the student's files, `save` checks them
    if index.dim != row_dim:
      raise IndexFileError(f'{workdir}/student/index holds {index.dim}-d rows but this student needs '
                           f'{row_dim}-d: the index was built for another model; rebuild it')
    if rerank is not None:
      base_index, embeddings, _ = rerank
      if base_index.dim != self.input_dim or not len(base_index) == len(embeddings) == len(index):
        raise IndexFileError(f'{workdir}/student/base_index holds {len(base_index)} rows of {base_index.dim}-d, '
                             f'for {len(embeddings)} embedded training images of {self.input_dim}-d features: '
                             'it was built for another training set; rerun distill')
    if featurizer is not None and isinstance(featurizer[0], TowerFeaturizer) and \
        featurizer[0].dim(featurizer[1]) != self.input_dim:
      raise AttributionError(f'the towers give {featurizer[0].dim(featurizer[1])}-d {featurizer[1]} features, the '
                             f'student in {workdir} takes {self.input_dim}-d: not the checkpoints its features came from')
    if prior is not None and (prior.ndim != 1 or len(prior) != len(index)):
      raise IndexFileError(f'{workdir}/student/image_prior.npy holds {prior.shape} values for {len(index)} '
                           'training images: it was written for another training set; rerun distill')

  def __repr__(self) -> str:
    kind = self.index.meta['kind'] + (f' of {self.index.meta["shards"]}' if 'shards' in self.index.meta else '')
    changes = [f'+{len(self.additions)} added'] * bool(len(self.additions)) + \
              [f'{len(self.removed)} removed'] * bool(len(self.removed))
    featurizer = f'feature {self.featurizer[1]}' if self.featurizer else 'no featurizer: pass features='
    return (f"Attributor('{self.workdir}': {self.distilled_rows:,} training images"
            f"{' (' + ', '.join(changes) + ')' if changes else ''}, {featurizer} ({self.input_dim}-d), "
            f"{kind} index{', reranked by the student' if self.rerank else ''})")

  @property
  def files_state(self) -> tuple | None:
    """The student folder's entries as they were when this attributor began loading them or last saved
    them: against `student_files_state` of the folder now, whether another process changed it since."""
    return self._files_at_load

  @classmethod
  def load(cls, workdir: str | Path, dino: str | None = None, clip: str | None = None,
           train_list: str | None = None) -> 'Attributor':
    """`dino` / `clip`: the Hugging Face checkpoints that a full-scale student's features came from
    (e.g. FastGDA's dino+clip_text); φ of (image, prompt) is then computed here. `train_list`: the
    training set's TSV (`image<TAB>caption`, in index order), for captions and the query grid."""
    from attrib.additions import distilled_rows, leave_out_unfinished_add, read_additions
    from attrib.distill import DEFAULT_TPU, load_student_run, restore_embedder, student_dir
    workdir = as_path(workdir)  # local or gs://
    student = student_dir(workdir)
    # Looked at before any file is read: a change while this loads is then seen by the next look
    # (`attrib serve` reloads, `save` refuses) rather than taken for what was loaded.
    try:
      files_before = student_files_state(student)
    except OSError:  # no student yet: load_student_run says what to run
      files_before = None
    run = load_student_run(workdir)
    index = load_any(student / 'index')
    # On one device, whatever slice distilled it: the student serves where it is loaded (a laptop, a
    # CPU server), its parameters held as numpy below.
    graphdef, params, _, _, _ = restore_embedder(workdir, run, tpu_path=DEFAULT_TPU)
    params = jax.tree.map(np.asarray, jax.device_get(params))
    additions = read_additions(student)
    n_train = distilled_rows(student, len(index) - len(additions or ()))
    featurizer, captions, images = None, None, None
    if dino or clip:
      from attrib.tower_features import query_featurizer, read_image_list
      featurizer = (query_featurizer(dino, clip), run.config.feature)
      if train_list:
        images, captions = read_image_list(train_list, check_images=False)
        if len(images) != n_train:
          raise IndexFileError(f'{train_list} lists {len(images)} training images, the student in {workdir} was '
                               f'distilled over {n_train}: another training set')
    elif (workdir / 'config.json').is_file() and (workdir / 'features').is_dir() and \
        set(run.config.feature.split('+')) <= set(DIGIT_PARTS):
      # A student of the built-in digits model in this workdir: φ is computed here from image + prompt.
      # (Not a full-scale student beside its imported model: its φ needs the towers, dino= and clip=.)
      from attrib.features import DigitFeaturizer, digit_feature_sets
      featurizer = (DigitFeaturizer(workdir), run.config.feature)
      images, captions = digit_feature_sets(workdir)['train']
    if additions is None:
      additions = empty_additions(int(params['layers'][0]['kernel'].shape[0]), isinstance(images, np.ndarray),
                                  isinstance(images, list))
    if captions is not None:
      captions = captions + additions.captions
    if isinstance(images, np.ndarray) and additions.images is not None:
      images = np.concatenate([images, additions.images])
    elif isinstance(images, list):  # images added as φ rows (features=) have no file: None
      images = images + (additions.paths if additions.paths is not None else [None] * len(additions))
    base_index, embeddings = None, None
    if run.config.rerank_candidates:
      from attrib.distill import BASE_INDEX
      embeddings_path = student / 'embeddings.npy'
      if not embeddings_path.is_file():
        raise IndexFileError(f'{embeddings_path} not found: rerun `launch.py attrib distill --workdir {workdir}`')
      base_index, embeddings = load_any(student / BASE_INDEX), load_npy(embeddings_path)
    prior = None
    if run.config.embedder.image_prior:
      from attrib.distill import IMAGE_PRIOR
      prior_path = student / IMAGE_PRIOR
      if not prior_path.is_file():
        raise IndexFileError(f'{prior_path} not found: rerun `launch.py attrib distill --workdir {workdir}`')
      prior = np.asarray(load_npy(prior_path), np.float32)
    embeddings, prior = leave_out_unfinished_add(student, n_train, len(additions), index, base_index, embeddings,
                                                 prior)
    rerank = None if base_index is None else (base_index, embeddings, run.config.rerank_candidates)
    attributor = cls(workdir, graphdef, params, index, featurizer, captions, images, rerank, prior)
    attributor.distilled_rows, attributor.additions = n_train, additions
    attributor.removed = read_removed(student, n_train + len(additions))
    attributor._files_at_load = files_before if files_before is not None else student_files_state(student)
    return attributor

  def features(self, images: Sequence, prompts: Sequence[str]) -> np.ndarray:
    self._check_queries(images, prompts)
    featurizer, name = self.featurizer
    if isinstance(featurizer, TowerFeaturizer):
      return featurizer(name, [tower_image(i) for i in images], list(prompts))
    return featurizer(name, np.stack([digit_pixels(i) for i in images]), list(prompts))

  def _check_queries(self, images: Sequence, prompts: Sequence[str]) -> None:
    if self.featurizer is None:
      raise AttributionError(f'{self.workdir}: this student was loaded without a featurizer; pass features=φ (the '
                             'same base feature as its training set) instead of image/prompt, or, for a full-scale '
                             'student, load it with dino= and clip= (the checkpoints its features came from)')
    if isinstance(prompts, str):  # its characters would pass for one prompt each
      raise AttributionError('prompts must be a list of strings, one per image, not one string')
    if len(images) != len(prompts):
      raise AttributionError(f'every image needs its prompt: {len(images)} images, {len(prompts)} prompts')
    for i, p in enumerate(prompts):
      self.check_prompt(p, 'the prompt' if len(prompts) == 1 else f'prompt {i}')

  def check_prompt(self, prompt, which: str = 'the prompt') -> None:
    """A query's prompt as this student takes it, checked before any feature is computed."""
    if not isinstance(prompt, str):
      raise AttributionError(f'{which} is of type {type(prompt).__name__}, not a string')
    name = self.featurizer[1] if self.featurizer else ''
    if any(part.endswith('text') for part in name.split('+')) and not prompt.strip():
      # An empty text still embeds (to the tokenizer's markers alone) and answers for another query.
      raise AttributionError(f'{which} is empty: this student\'s feature ({name}) embeds the prompt that '
                             'generated the image; pass that prompt')

  # ------------------------------------------------------------------ search
  def attribute(self, image=None, prompt: str | None = None, k: int | None = None, features=None,
                among=None) -> Attribution:
    """The k training images most influential on one generated image (or φ row), most first; `among`:
    training ids to answer among instead of the whole training set (attrib/among.py)."""
    batch = None if features is None else np.atleast_2d(np.asarray(features))
    if batch is not None and batch.ndim == 2 and len(batch) != 1:
      # Answering the first row alone would drop the others without a word.
      raise AttributionError(f'attribute takes one query; features of shape {batch.shape} hold {len(batch)}: '
                             'use attribute_batch')
    return self.attribute_batch(None if image is None else [image], None if prompt is None else [prompt], k,
                                features=batch, among=among)[0]

  def attribute_batch(self, images=None, prompts=None, k: int | None = None, features=None,
                      among=None) -> list[Attribution]:
    k, among = self.checked_request(k, among)
    if features is None:
      if images is None or prompts is None:
        raise AttributionError('pass image and prompt (or features=φ)')
      if len(images) or len(prompts):  # every prompt checked before the first image is read
        self._check_queries(images, prompts)
      return [answer for start in range(0, len(images), QUERIES_AT_ONCE)
              for answer in self._answer(self.features(images[start:start + QUERIES_AT_ONCE],
                                                       prompts[start:start + QUERIES_AT_ONCE]), k, among)]
    if images is not None or prompts is not None:
      # Which one would be attributed is a guess either way; say so instead of ignoring one.
      raise AttributionError('pass either image and prompt or features=φ, not both')
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != self.input_dim:
      raise AttributionError(f'features of shape {features.shape}: the embedder takes [b, {self.input_dim}]')
    refuse_non_finite(features)
    return [answer for start in range(0, len(features), QUERIES_AT_ONCE)
            for answer in self._answer(features[start:start + QUERIES_AT_ONCE], k, among)]

  def checked_request(self, k, among=None) -> tuple[int, np.ndarray | None]:
    """(k, `among` as answers take it: sorted ids, removed ones left out), k checked against what an
    answer can name, before any feature is computed or file written. k None: 10, or all of a smaller
    `among` (the commands' default)."""
    if among is not None:
      among = among_ids(among, len(self.index), self.removed)
    if k is None:
      k = min(10, len(self.index) - len(self.removed) if among is None else len(among))
    self._check_k(k, among)
    return k, among

  def _check_k(self, k, among: np.ndarray | None) -> None:
    """k against the images an answer can name: those not removed (of `among`, when given)."""
    if among is None:
      answerable = len(self.index) - len(self.removed)
      note = f' ({len(self.removed)} training images removed)' if len(self.removed) else ''
    else:
      answerable, note = len(among), ' (the ids to answer among, less any removed)'
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= answerable:
      raise AttributionError(f'k must be an integer in [1, {answerable}], got {k!r}{note}')

  def _answer(self, features: np.ndarray, k: int, among: np.ndarray | None = None) -> list[Attribution]:
    query = np.asarray(self._embed(features))
    with self._lock.reading():  # an addition changes the indexes, embeddings and prior together
      if among is None:
        return self._search(query, features, k)
      among = np.setdiff1d(among, self.removed)  # removed by another thread since attribute_batch
      self._check_k(k, among)
      return self._attributions(*search_among(self, query, features, k, among))

  def student_embeddings(self, ids: np.ndarray) -> np.ndarray:
    """Unit student embeddings [len(ids), d] of training images, distilled or added (saved or not)."""
    if self.rerank is not None:
      return self.rerank[1][ids]
    saved = self.distilled_rows + len(self.additions) - len(self._unsaved_embeddings)
    with self._embeddings_lock:
      if self._saved_embeddings is None:
        from attrib.distill import student_dir
        path = student_dir(self.workdir) / 'embeddings.npy'
        if not path.is_file():
          raise IndexFileError(f'{path} not found: rerun `launch.py attrib distill --workdir {self.workdir}`')
        stored = load_npy(path, mmap=True)
        if stored.ndim != 2 or len(stored) < saved or stored.shape[1] != self._unsaved_embeddings.shape[1]:
          raise IndexFileError(f'{path} holds {stored.shape} embeddings; this student needs at least {saved} '
                               f'rows of {self._unsaved_embeddings.shape[1]}: rerun distill')
        self._saved_embeddings = stored
      stored = self._saved_embeddings
    ids = np.asarray(ids, np.int64)
    rows = np.empty((len(ids), stored.shape[1]), np.float32)
    old = ids < saved
    rows[old] = stored[ids[old]]
    rows[~old] = self._unsaved_embeddings[ids[~old] - saved]
    return rows

  def _search(self, query: np.ndarray, features: np.ndarray, k: int) -> list[Attribution]:
    removed = self.removed  # each in the index once: fetch that many more, then drop them (removals.py)
    if k > len(self.index) - len(removed):  # removed by another thread since attribute_batch checked k
      raise AttributionError(f'k must be an integer in [1, {len(self.index) - len(removed)}], got {k!r} '
                             f'({len(removed)} training images removed)')
    if self.rerank is None:
      ids, dots = self.index.search(index_queries(query, self.scale, self.prior is not None), k + len(removed))
      ids, dots = first_kept(ids, removed, k, dots)
      cosine = cosine_from_dots(dots, self.scale, None if self.prior is None else self.prior[ids])
    else:
      base_index, embeddings, m = self.rerank
      m = min(m, len(base_index) - len(removed))
      ids, _ = base_index.search(np.asarray(unit_rows(features)), max(m, k) + len(removed))
      ids, = first_kept(ids, removed, max(m, k))
      cosine = np.einsum('qd,qkd->qk', query, embeddings[ids])
      prior = None if self.prior is None else self.prior[ids]
      order = rerank_by_student(ids, student_key(self.scale, cosine, prior), m)[:, :k]
      ids, cosine = np.take_along_axis(ids, order, axis=1), np.take_along_axis(cosine, order, axis=1)
    return self._attributions(ids, cosine)

  def _attributions(self, ids: np.ndarray, cosine: np.ndarray) -> list[Attribution]:
    """Answers from each query's training ids and cosines: scores, captions and files added."""
    logits = self.scale * cosine + self.offset + (0.0 if self.prior is None else self.prior[ids])
    scores = 1 / (1 + np.exp(-logits))
    files = self.train_images if isinstance(self.train_images, list) else None  # the digits are arrays, not files
    return [Attribution(ids=i, scores=s, cosine=c,
                        captions=None if self.captions is None else [self.captions[j] for j in i],
                        paths=None if files is None else [files[j] for j in i])
            for i, s, c in zip(ids, scores, cosine)]

  # ------------------------------------------------------------------ new training images
  def add_training_images(self, images=None, captions=None, features=None) -> np.ndarray:
    """New training images (and their captions), searchable at once; returns their training ids
    (after the training set's and earlier additions'). A student that computes φ itself takes images
    and captions, as `attribute` does (full scale: image files, which grids and results name); one
    distilled on precomputed features takes their φ rows (`features`). In memory until `save`.
    An image given again is added again, under a new id (`attrib add` refuses repeats: additions.py)."""
    new = new_training_images(self, images, captions, features)
    embedded = np.asarray(self._embed(new.features), np.float32)
    prior = None if self.prior is None else np.asarray(self._prior_of(new.features), np.float32)
    with self._lock.writing():
      start = self.distilled_rows + len(self.additions)
      ids = np.arange(start, start + len(new), dtype=np.int64)
      self.index.upsert(index_rows(embedded, prior), ids)
      if self.rerank is not None:
        base_index, embeddings, m = self.rerank
        base_index.upsert(np.asarray(unit_rows(new.features)), ids)
        self.rerank = (base_index, np.concatenate([embeddings, embedded]), m)
      if prior is not None:
        self.prior = np.concatenate([self.prior, prior])
      if self.captions is not None:
        self.captions = self.captions + new.captions
      if isinstance(self.train_images, np.ndarray):
        self.train_images = np.concatenate([self.train_images, new.images])
      elif isinstance(self.train_images, list):
        self.train_images = self.train_images + (new.paths if new.paths is not None else [None] * len(new))
      self.additions = self.additions.extended(new)
      self._unsaved_embeddings = np.concatenate([self._unsaved_embeddings, embedded])
    return ids

  def remove_training_images(self, ids) -> np.ndarray:
    """Training ids (distilled or added) that no answer names from now on; returns those newly removed
    (an id removed before is left as it is). Ids stay stable (removals.py). In memory until `save`."""
    with self._lock.writing():
      ids = checked_ids(ids, self.distilled_rows + len(self.additions))
      new = np.setdiff1d(ids, self.removed)
      if len(self.index) - len(self.removed) - len(new) < 1:
        raise AttributionError(f'removing {len(new)} more of the {len(self.index) - len(self.removed)} training images '
                               'left would leave none to answer with')
      self.removed = np.union1d(self.removed, new)
      self._removals_unsaved = self._removals_unsaved or bool(len(new))
    return new

  def save(self) -> None:
    """Added and removed training images written into the student's files: additions first (additions.py
    says in what order, and why a save cut short loses no earlier one), then the removed ids, so a
    saved removal never names an image whose addition was not saved.

    The files must be as this attributor loaded them: if another process saved its own additions or
    removals since (`attrib add` from a shell, a second service), or distilled again, writing this
    attributor's view would silently drop that change; refused instead, naming the workdir. While it
    writes, the workdir is held against other writing jobs (core/workdir_lock.py). On gs:// the check
    sees a save from another machine too (the objects' generations); two machines saving in the same
    instant are not kept apart (an object store has no lock)."""
    from attrib.distill import student_dir
    from core.workdir_lock import writing_into
    if not len(self._unsaved_embeddings) and not self._removals_unsaved:
      return
    student = student_dir(self.workdir)
    with self._lock.writing(), writing_into(self.workdir, f'Attributor.save() in pid {os.getpid()}'):
      if student_files_state(student) != self._files_at_load:
        raise AttributionError(f'{student} changed since this Attributor was loaded (another process saved '
                               'added or removed training images, or distilled again): saving would drop that '
                               'change, so nothing was written. Attributor.load the workdir again and repeat '
                               'this one (unsaved here: '
                               f'{len(self._unsaved_embeddings)} added, removals {self._removals_unsaved})')
      if len(self._unsaved_embeddings):
        self._save_additions()
      if self._removals_unsaved:
        write_removed(student, self.removed)
        self._removals_unsaved = False
      self._files_at_load = student_files_state(student)

  def _save_additions(self) -> None:
    from attrib.additions import write_additions
    from attrib.distill import BASE_INDEX, IMAGE_PRIOR, replace_index, student_dir
    from core.workdir import save_npy_atomic
    student = student_dir(self.workdir)
    total = self.distilled_rows + len(self.additions)
    if self.rerank is not None:
      embeddings = self.rerank[1]
    else:
      saved = load_npy(student / 'embeddings.npy', mmap=True)[:total - len(self._unsaved_embeddings)]
      embeddings = np.concatenate([saved, self._unsaved_embeddings])
    save_npy_atomic(student / 'embeddings.npy', embeddings)
    if self.prior is not None:
      save_npy_atomic(student / IMAGE_PRIOR, self.prior)
    replace_index(self.index, student / 'index')
    if self.rerank is not None:
      replace_index(self.rerank[0], student / BASE_INDEX)
    write_additions(student, self.additions)  # last: what makes the additions count on the next load
    self._unsaved_embeddings = self._unsaved_embeddings[:0]
    with self._embeddings_lock:
      self._saved_embeddings = None  # a map of the file replaced, without the rows just saved

  def measure_latency(self, features: np.ndarray, count: int = 50, images=None, prompts=None) -> dict:
    """p50 / p95 / mean ms of single-query attribute() (from image + prompt when given), after warm-up."""
    def one(q):
      if images is not None:
        self.attribute(image=images[q % len(images)], prompt=prompts[q % len(prompts)])
      else:
        self.attribute(features=features[q % len(features)])
    for q in range(3):
      one(q)
    times = []
    for q in range(count):
      start = time.perf_counter()
      one(q)
      times.append((time.perf_counter() - start) * 1e3)
    return {'p50': float(np.percentile(times, 50)), 'p95': float(np.percentile(times, 95)),
            'mean': float(np.mean(times)), 'queries': count,
            'with_features': images is not None}
