"""Images as users hand them to attribution, without a model: query images as the attributor takes
them (attrib/query_images.py) and training-image lists (TSV), their conversions and the errors a user sees. The whole path through `Attributor.attribute` is tested in
test_digits_attribution.py and test_vision_towers.py."""
import numpy as np
import pytest
from PIL import Image

from attrib.query_images import AttributionError, digit_pixels, tower_image


def test_digit_pixels_convert_uint8_and_keep_float_pixels():
  grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
  np.testing.assert_array_equal(digit_pixels(grey)[..., 0], grey.astype(np.float32) / 127.5 - 1)
  model_pixels = np.linspace(-1, 1, 256, dtype=np.float32).reshape(16, 16, 1)
  np.testing.assert_array_equal(digit_pixels(model_pixels), model_pixels)
  # A wide image: its centred square, not the whole image squashed.
  wide = np.zeros((16, 32), np.uint8)
  wide[:, 8:24] = grey
  np.testing.assert_array_equal(digit_pixels(wide), digit_pixels(grey))


@pytest.mark.parametrize('convert', [digit_pixels, tower_image])
def test_an_image_without_pixels_is_refused(convert, tmp_path):
  """A 0x0 array once came back as a blank 16x16 query, and got an answer."""
  for empty in (np.zeros((0, 0, 3), np.uint8), np.zeros((0, 7), np.uint8), Image.new('RGB', (0, 4))):
    with pytest.raises(AttributionError, match='has no pixels'):
      convert(empty)


def test_errors_name_the_shape_as_given(tmp_path):
  with pytest.raises(AttributionError, match=r'float image of shape \(512, 512, 3\): the digits model takes 16x16'):
    digit_pixels(np.zeros((512, 512, 3), np.float32))  # once reported (512, 512), its channel mean
  with pytest.raises(AttributionError, match=r'image of shape \(4, 4, 2\): expected'):
    digit_pixels(np.zeros((4, 4, 2), np.float32))
  with pytest.raises(AttributionError, match=r'values must be finite and in \[-1, 1\]'):
    digit_pixels(np.full((16, 16), 255.0, np.float32))
  with pytest.raises(AttributionError, match='dtype bool'):
    digit_pixels(np.ones((16, 16), bool))
  with pytest.raises(AttributionError, match='got list'):
    digit_pixels([[0] * 16] * 16)
  (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  for convert in (digit_pixels, tower_image):
    with pytest.raises(AttributionError, match='broken.png: not a readable image'):
      convert(str(tmp_path / 'broken.png'))
  with pytest.raises(AttributionError, match=r'got array of float32 \(8, 8, 3\)'):
    tower_image(np.zeros((8, 8, 3), np.float32))


def test_image_lists_from_spreadsheets_and_windows_editors_read_as_typed(tmp_path):
  """A TSV saved with a byte-order mark (Excel, Notepad) once named its first image '\\ufeffa.png',
  not found; CRLF line ends and blank lines are taken too. Relative names count from the list."""
  from attrib.tower_features import read_image_list
  from core.errors import UserError
  for name in ('a.png', 'b.png'):
    Image.new('RGB', (8, 8)).save(tmp_path / name)
  (tmp_path / 'list.tsv').write_bytes('\ufeffa.png\ta seven\r\n\r\nb.png\ta two, in ink\r\n'.encode())
  assert read_image_list(tmp_path / 'list.tsv') == ([str(tmp_path / 'a.png'), str(tmp_path / 'b.png')],
                                                     ['a seven', 'a two, in ink'])
  (tmp_path / 'bad.tsv').write_text('a.png\tok\nno tab here\n')
  with pytest.raises(UserError, match=r"bad.tsv:2: expected `image path<TAB>caption`, got 'no tab here'"):
    read_image_list(tmp_path / 'bad.tsv')


def test_a_folder_given_as_the_query_image_is_named(tmp_path):
  """`attrib query --image FOLDER` said 'not a readable image ([Errno 21] Is a directory)'."""
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / 'q.png')
  for convert in (digit_pixels, tower_image):
    with pytest.raises(AttributionError, match=rf'^{tmp_path} is a folder: a query is one image '
                                               r'\(Attributor.attribute_batch takes many\)$'):
      convert(str(tmp_path))
    convert(str(tmp_path / 'q.png'))
