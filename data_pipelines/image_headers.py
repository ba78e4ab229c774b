"""A folder's image headers, read before streaming it: which files are not images, and their sizes.

A streamed folder (data_pipelines/streamed_images.py) reads every file's header first, so files that
are not images are left out by name, as in memory, and every reader leaves out the same ones. That
is one open per file: 0.46 ms of a core locally, tens of ms of latency on gs://, so for ImageNet's
1.28M files minutes to tens of minutes. On a slice every host needs the result; reading it on every
host would cost each of them that time, so the hosts read a share each and exchange what they found
(`lvm tokenize`: core.distributed.each_process), and Beam workers take their driver's.

The result is small whatever the folder's size: the problems (few) and one number for the sizes, a
sum of per-file hashes, which is the same however the files were shared out, so a resumed job on
any number of hosts compares the same fingerprint.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib

from core import progress
from core.config import ConfigError
from core.paths import is_remote
from data_pipelines.image_sources import ImageDataError

_SUM_BITS = 128


def _header_ok(path) -> tuple[str | None, int]:
  """(None when `path` opens as an image, else why not; its size in bytes). The header only: PIL
  decodes no pixels here. The size comes with the open file (no request more on gs://)."""
  import contextlib
  import os
  from PIL import Image
  try:
    with contextlib.ExitStack() as stack:  # a local file by its name: PIL's errors then name it, not a reader
      if not is_remote(path):
        stack.enter_context(Image.open(path))
        return None, os.path.getsize(path)
      handle = stack.enter_context(path.open('rb'))
      stack.enter_context(Image.open(handle))
      return None, handle.seek(0, 2)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    return f'{type(e).__name__}: {e}', -1


def _file_hash(index: int, size: int) -> int:
  return int.from_bytes(hashlib.blake2b(f'{index}:{size}'.encode(), digest_size=_SUM_BITS // 8).digest(), 'little')


def listing_digest(root, files: list) -> str:
  """The listing's names, relative to the folder: the scans of two readers are of one listing."""
  return hashlib.sha256('\n'.join(str(f.relative_to(root)) for f in files).encode()).hexdigest()[:16]


@dataclasses.dataclass
class HeaderScan:
  """What reading (some of) a listing's headers found. `problems`: listing index -> why the file is
  no image; `sizes_sum`: the sum, modulo 2^128, of a hash of (index, size) of each file read (size
  -1 for a file that is no image): partial scans of a listing add up to the whole one's."""
  count: int
  listing: str
  problems: dict[int, str]
  sizes_sum: int
  files_read: int

  def to_json(self) -> dict:
    return {'count': self.count, 'listing': self.listing, 'problems': {str(i): p for i, p in self.problems.items()},
            'sizes_sum': format(self.sizes_sum, 'x'), 'files_read': self.files_read}

  @staticmethod
  def from_json(value: dict) -> HeaderScan:
    return HeaderScan(value['count'], value['listing'], {int(i): p for i, p in value['problems'].items()},
                      int(value['sizes_sum'], 16), value['files_read'])

  @staticmethod
  def merged(scans: list[HeaderScan]) -> HeaderScan:
    """Shares of one listing as the whole listing's scan; listings that differ are refused."""
    if len({(scan.count, scan.listing) for scan in scans}) != 1:
      raise ConfigError('the image folder listed differently on different hosts (files added or removed while '
                        'the job started): ' + ', '.join(f'{scan.count} files ({scan.listing})' for scan in scans))
    problems = {i: p for scan in scans for i, p in scan.problems.items()}
    total = sum(scan.sizes_sum for scan in scans) % (1 << _SUM_BITS)
    return HeaderScan(scans[0].count, scans[0].listing, problems, total, sum(scan.files_read for scan in scans))

  @property
  def sizes_sha256(self) -> str:
    """The sizes' fingerprint for a resumed job: complete only once every file's header was read."""
    if self.files_read != self.count:
      raise RuntimeError(f'a scan of {self.files_read} of {self.count} files has no fingerprint of their sizes')
    return hashlib.sha256(f'{self.count}:{self.sizes_sum:x}'.encode()).hexdigest()[:16]


def scan_headers(root, files: list, threads: int = 32, share: tuple[int, int] = (0, 1)) -> HeaderScan:
  """Reads the headers of files i with i % hosts == host (`share` = (host, hosts); all by default),
  in `threads` threads."""
  host, hosts = share
  indices = range(host, len(files), hosts)
  desc = f'{root}: image headers' + (f' (a share of {len(indices):,} of {len(files):,} on each of {hosts} hosts)'
                                     if hosts > 1 else '')
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    checked = list(progress.bar(pool.map(_header_ok, [files[i] for i in indices]), total=len(indices), desc=desc,
                                unit='file'))
  problems = {i: problem for i, (problem, _) in zip(indices, checked) if problem}
  sizes_sum = sum(_file_hash(i, size) for i, (_, size) in zip(indices, checked)) % (1 << _SUM_BITS)
  return HeaderScan(len(files), listing_digest(root, files), problems, sizes_sum, len(indices))


def unreadable_files(scan: HeaderScan, files: list, where: str, strict: bool = False) -> set[int]:
  """The indices of `files` that are not images, each said by name (`strict`: the first fails)."""
  if strict and scan.problems:
    first = min(scan.problems)
    raise ImageDataError(f'{files[first]}: not a readable image ({scan.problems[first]})')
  for i in sorted(scan.problems):
    progress.say(f'warning: skipped {files[i]}: not a readable image ({scan.problems[i]})')
  if scan.problems:
    progress.say(f'{where}: skipped {len(scan.problems)} of {len(files)} files (not readable images)')
  return set(scan.problems)


def scan_on_every_host(source: str, listed: tuple | None, step: str) -> tuple[tuple, HeaderScan]:
  """(the folder's listing, the whole scan) on every host of a slice, each host having read a share
  of the headers: `step` names the exchange (core.distributed.each_process; not inside an
  all_or_none step). `listed`: this host's `image_files(source)`, when listed already."""
  import jax
  from core.distributed import each_process
  from data_pipelines.image_sources import image_files
  me, hosts, holder = jax.process_index(), jax.process_count(), {}

  def share():
    holder['listed'] = listed or image_files(source)
    return scan_headers(*holder['listed'], share=(me, hosts)).to_json()
  shares = each_process(step, share)
  progress.say(f'{source}: the headers of its {shares[me]["count"]:,} image files read, {shares[me]["files_read"]:,} '
               f'of them on this host, the rest on the {hosts - 1} other(s)')
  return holder['listed'], HeaderScan.merged([HeaderScan.from_json(one) for one in shares])
