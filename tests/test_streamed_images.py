"""Tokenizer training images streamed from disk (data_pipelines/streamed_images.py): the same
records, batch for batch, as the images decoded into memory, and which sources 'auto' streams.
(`lvm train-tokenizer` on a streamed folder, resumed too: test_perceptual.py.)"""
import numpy as np
import pytest
from PIL import Image

from data_pipelines.image_sources import digit_images, folder_images
from data_pipelines.streamed_images import FolderImageStream
from data_pipelines.token_loader import record_batches
from lvm.tokenizer_images import InMemoryImages, report_images


def _digit_folder(root, count=40):
  """`count` digits as 8-bit PNGs in two class folders, with a file that is no image and a hidden one."""
  images, _ = digit_images(32)
  for i in range(count):
    folder = root / ('even' if i % 2 == 0 else 'odd')
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((images[i] * 255).round().astype(np.uint8)).save(folder / f'{i:03d}.png')
  (root / 'odd' / 'saved_error_page.jpg').write_text('<html>403 Forbidden</html>')
  (root / 'even' / '._000.png').write_bytes(b'\x00\x05\x16\x07 Mac metadata')
  return root


def test_streamed_batches_are_the_in_memory_batches(tmp_path, capsys):
  """Batch for batch over three epochs, on either host of two, read by four loader threads: the
  streamed folder gives exactly the arrays the in-memory one does, the same file skipped by name."""
  root = _digit_folder(tmp_path / 'digits')
  found = folder_images(root, 32)
  streamed = FolderImageStream(root, 32)
  assert streamed.skipped == found.skipped == [str(root / 'odd' / 'saved_error_page.jpg')]
  assert len(streamed) == len(found.images) == 40
  np.testing.assert_array_equal(streamed.labels, found.labels)  # class subfolders, numbered alike
  assert 'saved_error_page.jpg: not a readable image' in capsys.readouterr().err
  in_memory = InMemoryImages(found.images, str(root))
  for host in (0, 1):
    batches = [record_batches(source, global_batch=16, seed=7, process_index=host, process_count=2,
                              prefetch_threads=threads) for source, threads in ((in_memory, 0), (streamed, 4))]
    for _ in range(8):  # 8 batches of 16 over 40 images: three epochs, each shuffled its own way
      expected, got = (next(b)['images'] for b in batches)
      assert got.shape == (8, 32, 32, 3)
      np.testing.assert_array_equal(got, expected)
  # The closing report reads the same images of either (all of them, up to REPORT_IMAGES).
  np.testing.assert_array_equal(report_images(streamed), found.images)


def test_a_file_truncated_after_its_header_gives_way_to_the_next(tmp_path, capsys):
  """Its header reads, so the scan keeps it; its pixels do not: the next file is used in its place,
  named once however often it is read, and the run goes on."""
  root = _digit_folder(tmp_path / 'digits', count=6)
  good = (root / 'even' / '002.png').read_bytes()
  (root / 'even' / '002.png').write_bytes(good[:len(good) // 2])
  streamed = FolderImageStream(root, 32)
  assert len(streamed) == 6 and streamed.skipped == [str(root / 'odd' / 'saved_error_page.jpg')]
  position = streamed.files.index(root / 'even' / '002.png')
  for _ in range(2):
    np.testing.assert_array_equal(streamed[position]['images'], streamed.image(position + 1))
  err = capsys.readouterr().err
  assert err.count('002.png: not a readable image') == 1 and 'the next readable file is used in its place' in err


def test_auto_streams_what_would_take_over_a_quarter_of_the_free_memory(tmp_path, monkeypatch, capsys):
  import lvm.tokenizer_images
  from data_pipelines.image_sources import ImageDataError
  from lvm.tokenizer_images import training_images
  root = _digit_folder(tmp_path / 'digits')  # 41 image files: 0.5 MiB decoded at 32 px
  monkeypatch.setattr(lvm.tokenizer_images, 'available_memory_gib', lambda: 0.0004)
  streamed = training_images(str(root), 32, 'auto')
  assert repr(streamed) == f'{root} (40 images, streamed)'
  assert (f"{root}: 41 image files decode to 0.5 MiB, more than a quarter of this host's 0.4 MiB of free memory: "
          'they are streamed, decoded as the loader reads them (data.stream=never holds them in memory)'
          in capsys.readouterr().err)
  assert isinstance(training_images(str(root), 32, 'never'), InMemoryImages)
  monkeypatch.setattr(lvm.tokenizer_images, 'available_memory_gib', lambda: 0.01)
  held = training_images(str(root), 32, 'auto')
  assert isinstance(held, InMemoryImages) and len(held) == 40
  assert 'streamed' not in capsys.readouterr().err
  assert isinstance(training_images('builtin:digits', 32, 'auto'), InMemoryImages)  # never streamed
  with pytest.raises(ImageDataError, match='no such image folder'):  # the folder listed before any choice
    training_images(str(tmp_path / 'none'), 32, 'auto')


@pytest.mark.parametrize('count', [10, 5000])
def test_the_report_reads_every_image_or_an_even_spread(count):
  class Counted:
    def __len__(self):
      return count

    def images_at(self, indices):
      return np.asarray(indices)

  picked = report_images(Counted())
  assert len(picked) == min(count, 4096) and picked[0] == 0 and picked[-1] == count - 1
  assert len(set(picked.tolist())) == len(picked)


def test_header_shares_add_up_to_the_whole_folder_and_refuse_another_listing(tmp_path):
  """A slice's hosts read a share of a streamed folder's headers each: put together, the shares are
  the one-host scan (the same files left out, the same fingerprint of the sizes), for any number of
  hosts; a listing that differs between readers is refused, and a file of another size changes the
  fingerprint."""
  from core.config import ConfigError
  from data_pipelines.image_headers import HeaderScan, scan_headers
  from data_pipelines.image_sources import image_files
  root, files = image_files(_digit_folder(tmp_path / 'digits', count=12))
  whole = scan_headers(root, files)
  assert [str(files[i].relative_to(root)) for i in whole.problems] == ['odd/saved_error_page.jpg']
  for hosts in (2, 3, 5):
    shares = [HeaderScan.from_json(scan_headers(root, files, share=(h, hosts)).to_json()) for h in range(hosts)]
    assert sum(share.files_read for share in shares) == len(files) == 13
    merged = HeaderScan.merged(shares)
    assert merged.problems == whole.problems and merged.sizes_sha256 == whole.sizes_sha256
    with pytest.raises(RuntimeError, match='no fingerprint'):
      shares[0].sizes_sha256
  with pytest.raises(ConfigError, match='listed differently on different hosts'):
    HeaderScan.merged([scan_headers(root, files, share=(0, 2)), scan_headers(root, files[1:], share=(1, 2))])
  # The same names, one file rewritten at another size: another fingerprint. A stream given another
  # listing's scan is refused.
  (root / 'even' / '002.png').write_bytes((root / 'even' / '002.png').read_bytes() + b'\0')
  assert scan_headers(root, files).sizes_sha256 != whole.sizes_sha256
  with pytest.raises(ConfigError, match='lists 12 image files here and 13 where its headers were read'):
    FolderImageStream(root, 32, listed=(root, files[1:]), scanned=whole)
