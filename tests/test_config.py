"""Typed `--set` overrides: values parsed to the field type, unknown keys listed, bad values named."""
import pytest

from core.config import ConfigError, apply_overrides, load_config_file
from tests.helpers import CPU8, ROOT, TINY


def test_overrides_parse_to_declared_types():
  config = apply_overrides(load_config_file(TINY), [
      'train.steps=7', 'optim.lr=0.5', 'train.progress_bar=false', 'model.compute_dtype=bfloat16',
      'model.remat_policy=full', 'data.train_path=/some/dir'])
  assert config.train.steps == 7 and isinstance(config.train.steps, int)
  assert config.optim.lr == 0.5 and isinstance(config.optim.lr, float)
  assert config.train.progress_bar is False
  assert config.model.compute_dtype == 'bfloat16'
  assert config.model.remat_policy == 'full'
  assert config.data.train_path == '/some/dir'
  assert load_config_file(TINY).train.steps == 300  # the original is untouched (frozen)


def test_unknown_key_lists_valid_ones():
  with pytest.raises(ConfigError) as error:
    apply_overrides(load_config_file(TINY), ['train.stpes=3'])
  message = str(error.value)
  assert "'train.stpes'" in message and 'train.steps' in message and 'optim.lr' in message


@pytest.mark.parametrize('typo, guess', [('train.lr', 'optim.lr'), ('optim.learning_rate', 'optim.lr'),
                                         ('model.hiden_size', 'model.hidden_size'),
                                         ('train.batch_size', 'train.global_batch')])
def test_unknown_key_suggests_the_one_meant(typo, guess):
  with pytest.raises(ConfigError, match=rf"unknown config key '{typo}' \(did you mean '{guess}'\?\)"):
    apply_overrides(load_config_file(TINY), [f'{typo}=1'])
  with pytest.raises(ConfigError) as error:
    apply_overrides(load_config_file(TINY), ['zzz=1'])
  assert 'did you mean' not in str(error.value)  # no guess beats a wrong guess


def test_whole_floats_are_ints_and_floats_are_finite():
  assert apply_overrides(load_config_file(TINY), ['train.steps=1e3']).train.steps == 1000
  assert apply_overrides(load_config_file(TINY), ['train.steps=2_000']).train.steps == 2000
  for text in ('1.5', '2.5e0', 'abc', 'inf'):
    with pytest.raises(ConfigError, match=rf"'train.steps'.*'{text}' is not a whole number"):
      apply_overrides(load_config_file(TINY), [f'train.steps={text}'])
  for text in ('nan', 'inf', '-inf'):  # nan passes every `lr > 0`-style check, then trains to nan
    with pytest.raises(ConfigError, match=rf"'optim.lr'.*'{text}' is not a finite number"):
      apply_overrides(load_config_file(TINY), [f'optim.lr={text}'])


@pytest.mark.parametrize('override, field', [
    ('train.steps=many', 'train.steps'),
    ('train.progress_bar=maybe', 'train.progress_bar'),
    ('model.compute_dtype=float64', 'model.compute_dtype'),
])
def test_bad_values_name_the_field(override, field):
  with pytest.raises(ConfigError, match=field):
    apply_overrides(load_config_file(TINY), [override])


def test_validation_runs_after_override():
  with pytest.raises(ValueError, match='num_kv_heads'):
    apply_overrides(load_config_file(TINY), ['model.num_kv_heads=3'])
  with pytest.raises(ValueError, match='train.steps'):
    apply_overrides(load_config_file(TINY), ['train.steps=0'])
  with pytest.raises(ConfigError, match='group'):
    apply_overrides(load_config_file(TINY), ['model=3'])
  with pytest.raises(ConfigError, match='key=value'):
    apply_overrides(load_config_file(TINY), ['train.steps'])


def test_fields_that_depend_on_each_other_validate_together():
  # A perceptual weight needs its weights file: valid in either order, one check of the final pair.
  from lvm.tokenizer_task import TokenizerRunConfig
  config = load_config_file('lvm/configs/tokenizer_tiny.py', expect=TokenizerRunConfig)
  pair = ['loss.perceptual_weight=1.0', 'loss.perceptual_weights=/w/lpips.pth']
  for overrides in (pair, pair[::-1]):
    loss = apply_overrides(config, overrides + ['train.steps=7']).loss
    assert (loss.perceptual_weight, loss.perceptual_weights) == (1.0, '/w/lpips.pth')
  with pytest.raises(ConfigError, match='needs loss.perceptual_weights'):
    apply_overrides(config, pair[:1])
  # Later overrides still win, and every key is checked even when a later one replaces it.
  assert apply_overrides(config, ['train.steps=3', 'train.steps=5']).train.steps == 5
  with pytest.raises(ConfigError, match='unknown config key'):
    apply_overrides(config, ['loss.perceptual=1', 'train.steps=5'])


def test_tuple_override_on_preset():
  preset = apply_overrides(load_config_file(CPU8), ['ici_mesh=(1,4,2)'])
  assert preset.ici_mesh == (1, 4, 2)
  with pytest.raises(ValueError, match='at most one -1'):
    apply_overrides(load_config_file(CPU8), ['ici_mesh=-1,-1,2'])


@pytest.mark.parametrize('text, expected', [('(1,4,2)', (1, 4, 2)), ('[1, 4, 2]', (1, 4, 2)), ('1,4,2', (1, 4, 2))])
def test_tuple_override_forms(text, expected):
  assert apply_overrides(load_config_file(CPU8), [f'ici_mesh={text}']).ici_mesh == expected


def _fastgda_digits():
  from attrib.fastgda_config import FastGDAConfig
  return load_config_file('attrib/configs/fastgda_digits.py', expect=FastGDAConfig)


@pytest.mark.parametrize('text', ['(16,)', '[16,]', '16', '(16)'])
def test_one_item_tuple_override(text):
  # Python's one-item tuple '(16,)' was a JSON error.
  assert apply_overrides(_fastgda_digits(), [f'map_at={text}']).map_at == (16,)


@pytest.mark.parametrize('text', ['(1,4,2', '[1,4,2)', '(1,4.5,2)'])
def test_malformed_tuple_override_is_refused_by_name(text):
  with pytest.raises(ConfigError, match="'ici_mesh'"):
    apply_overrides(load_config_file(CPU8), [f'ici_mesh={text}'])
  # The brackets were once dropped without checking that they matched: 'map_at=(16' read as (1,).
  with pytest.raises(ConfigError, match="'map_at'.*not closed"):
    apply_overrides(_fastgda_digits(), ['map_at=(16'])


def test_string_tuple_override_takes_bare_words_in_brackets():
  config = _fastgda_digits()
  for text in ('[pixels, text]', '(pixels,text)', 'pixels,text', '["pixels", "text"]'):
    assert apply_overrides(config, [f'compare_features={text}']).compare_features == ('pixels', 'text')


TOKENIZER_TINY, DIGITS = 'lvm/configs/tokenizer_tiny.py', 'attrib/configs/digits.py'
FASTGDA_DIGITS = 'attrib/configs/fastgda_digits.py'


@pytest.mark.parametrize('path, override, message', [
    (TINY, 'model.rms_eps=0', 'model.rms_eps must be > 0, got 0.0'),
    (TINY, 'model.rope_theta=0', 'model.rope_theta must be > 0'),  # a division by zero, then NaN, before
    (TINY, 'optim.b1=1.5', r'optim.b1 and optim.b2 must be in \[0, 1\), got 1.5'),  # diverged at step 230
    (TINY, 'optim.weight_decay=-0.1', 'optim.eps and optim.weight_decay must be >= 0'),
    (TINY, 'data.read_threads=-1', 'data.read_threads must be >= 0'),  # grain's ValueError, after writing
    (TOKENIZER_TINY, 'tokenizer.commitment=-1', 'tokenizer.commitment must be >= 0'),
    (TOKENIZER_TINY, 'tokenizer.block_out_channels=()', 'needs one or more levels'),
    (DIGITS, 'schedule.num_train_timesteps=0', 'schedule.num_train_timesteps must be >= 1'),
    (DIGITS, 'schedule.beta_schedule=cosine', "schedule.beta_schedule 'cosine'"),
    (DIGITS, 'unet.norm_eps=0', 'unet.norm_eps must be > 0'),
    (DIGITS, 'unet.block_out_channels=()', 'unet.block_out_channels needs one or more'),
    (DIGITS, 'data.text_len=1', r'data.text_len must be in \[2, 512\]'),  # 1 was not truncated at all
    (FASTGDA_DIGITS, 'map_at=(0,)', 'map_at needs one or more L >= 1'),
    (FASTGDA_DIGITS, 'index.num_leaves=-1', 'index.num_leaves must be >= 0'),
    (FASTGDA_DIGITS, 'index.tree_above=10', r"index.brute_force_below \(20000\) and index.tree_above \(10\)"),
])
def test_out_of_range_values_are_refused_when_the_config_loads(path, override, message):
  with pytest.raises(ConfigError, match=message):
    apply_overrides(load_config_file(path), [override])


def test_attention_blocks_must_tile_the_records():
  from lvm.task import NextTokenTask
  model = load_config_file(TINY).model  # attention_block 128
  NextTokenTask(model, 256)
  NextTokenTask(model, 64)  # shorter than one block: one block
  with pytest.raises(ConfigError, match='data.seq_len 192 is not a multiple of model.attention_block 128'):
    NextTokenTask(model, 192)


def test_a_recorded_preset_is_found_on_another_machine(tmp_path):
  """Workdirs record their preset's absolute path on the machine that trained them: elsewhere the
  preset of that name in this checkout's tpu_configs/ stands in; an unknown one is named on load."""
  from core.mesh import PRESET_DIR, load_preset, recorded_preset
  assert recorded_preset(CPU8) == CPU8
  assert recorded_preset('/home/someone/checkout/tpu_configs/v4_32.py') == str(PRESET_DIR / 'v4_32.py')
  for foreign in ('/home/someone/checkout/tpu_configs/my_slice.py', '/home/someone/presets/cpu_8.py'):
    assert recorded_preset(foreign) == foreign
    with pytest.raises(ConfigError, match=f'slice preset {foreign} not found: pass --tpu'):
      load_preset(foreign)


def test_a_run_continues_on_its_data_named_another_way(tmp_path, monkeypatch):
  """`lvm train` rerun on the same data folder spelled otherwise ('sent' from its parent, then an
  absolute or '../' path from elsewhere) continues the run; other data is still refused."""
  import json
  from core.config import to_dict
  from lvm.commands import _check_same_model, data_location, data_record, run_config
  (tmp_path / 'sent').mkdir()
  (tmp_path / 'other').mkdir()
  (tmp_path / 'run').mkdir()
  monkeypatch.chdir(tmp_path)
  config = apply_overrides(load_config_file(TINY), ['data.train_path=sent'])
  stored = {'config': to_dict(config), 'tpu': CPU8}
  for recorded in (True, False):  # runs from before the absolute path was recorded: from the same folder
    (tmp_path / 'run' / 'config.json').write_text(json.dumps(
        {**stored, 'train_data': data_location('sent')} if recorded else stored))
    monkeypatch.chdir(tmp_path / 'run' if recorded else tmp_path)
    if recorded:
      _check_same_model(tmp_path / 'run', apply_overrides(config, ['data.train_path=../sent']))
    _check_same_model(tmp_path / 'run', apply_overrides(config, [f'data.train_path={tmp_path / "sent"}']))
    with pytest.raises(ConfigError, match=r"different data settings \{'train_path': 'sent -> \.\./other'\}"):
      _check_same_model(tmp_path / 'run', apply_overrides(config, ['data.train_path=../other']))
  # The run folder moved together with its data (a quickstart folder copied elsewhere, then rerun):
  # the data where the recorded relative path leads from the workdir's new place. It had been refused.
  (tmp_path / 'run' / 'config.json').write_text(json.dumps({**stored, **data_record('sent', tmp_path / 'run')}))
  moved = tmp_path / 'moved'
  moved.mkdir()
  for name in ('run', 'sent', 'other'):
    (tmp_path / name).rename(moved / name)
  monkeypatch.chdir(tmp_path)
  _check_same_model(moved / 'run', apply_overrides(config, ['data.train_path=moved/sent']))
  with pytest.raises(ConfigError, match=r"different data settings \{'train_path': 'sent -> moved/other'\}"):
    _check_same_model(moved / 'run', apply_overrides(config, ['data.train_path=moved/other']))
  # A rerun without --config continues with the recorded config, its data found from any folder
  # (the recorded 'sent' counted from the folder the run started in): moved with the workdir, and
  # else at the absolute path recorded.
  for folder in (tmp_path, moved / 'run'):
    monkeypatch.chdir(folder)
    recorded = run_config(None, moved / 'run', ['train.steps=7'])
    assert recorded.data.train_path == str(moved / 'sent') and recorded.train.steps == 7
    assert recorded.model == config.model
    _check_same_model(moved / 'run', recorded)
  (moved / 'sent').rename(tmp_path / 'sent')
  assert run_config(None, moved / 'run', []).data.train_path == str(tmp_path / 'sent')
  with pytest.raises(ConfigError, match=r'--config: the config file of a new run, e\.g\. lvm/configs/tiny\.py'):
    run_config(None, tmp_path / 'new', [])


def test_a_diffusion_run_continues_with_its_exclude_file_named_another_way(tmp_path, monkeypatch):
  """`attrib train-model` rerun with the same data.exclude_path spelled otherwise (relative, then
  absolute or from another folder) continues the run; another file is still refused."""
  import json
  from attrib.commands import _run_config, check_same_run
  from core.config import to_dict
  from core.paths import absolute
  digits = str(ROOT / 'attrib/configs/digits.py')
  (tmp_path / 'run').mkdir()
  for name in ('x.txt', 'y.txt'):
    (tmp_path / name).write_text('3,5\n')
  monkeypatch.chdir(tmp_path)
  config = apply_overrides(load_config_file(digits), ['data.exclude_path=x.txt'])
  (tmp_path / 'run' / 'config.json').write_text(json.dumps(
      {'config': to_dict(config), 'tpu': CPU8, 'exclude_file': absolute('x.txt')}))
  check_same_run(tmp_path / 'run', apply_overrides(config, [f'data.exclude_path={tmp_path / "x.txt"}']))
  monkeypatch.chdir(tmp_path / 'run')
  check_same_run(tmp_path / 'run', apply_overrides(config, ['data.exclude_path=../x.txt']))
  with pytest.raises(ConfigError, match=r"different data settings \{'exclude_path': 'x.txt -> \.\./y.txt'\}"):
    check_same_run(tmp_path / 'run', apply_overrides(config, ['data.exclude_path=../y.txt']))
  with pytest.raises(ConfigError, match=r"'exclude_path': 'x.txt -> '"):
    check_same_run(tmp_path / 'run', apply_overrides(config, ['data.exclude_path=']))
  # A rerun without --config: the recorded config, its exclude file by the absolute path recorded.
  recorded = _run_config(None, tmp_path / 'run')
  assert recorded.data.exclude_path == str(tmp_path / 'x.txt') and recorded.unet == config.unet
  check_same_run(tmp_path / 'run', recorded)


def test_a_config_files_own_error_is_named_by_file_and_line(tmp_path):
  """A config is the user's code: an import it lacks or a name it misspells was a traceback from
  importlib; now the file, the line and the error, as for a syntax error."""
  cases = {'import nosuchmodule\n': r"line 1: ModuleNotFoundError: No module named 'nosuchmodule'",
           'from lvm.configs.tiny import get_config as base\n\ndef get_config():\n  return base().replace(x=1)\n':
               r"line 4: AttributeError: 'LvmConfig' object has no attribute 'replace'",
           'def get_config():\n  return {}["model"]\n': r"line 2: KeyError: 'model'"}
  for number, (text, said) in enumerate(cases.items()):
    (tmp_path / f'c{number}.py').write_text(text)
    with pytest.raises(ConfigError, match=rf'c{number}.py {said}'):
      load_config_file(tmp_path / f'c{number}.py')


def test_the_bundled_configs_are_found_from_any_folder(tmp_path, monkeypatch):
  """The README's relative `--config lvm/configs/tiny.py --tpu tpu_configs/cpu_8.py` from another
  folder than the checkout was 'config file not found'; a file of that name in the current folder
  still comes first, and a name found nowhere is still named."""
  from core.mesh import PRESET_DIR, load_preset, preset_to_record
  monkeypatch.chdir(tmp_path)
  assert load_config_file('lvm/configs/tiny.py') == load_config_file(TINY)
  assert load_preset('tpu_configs/cpu_8.py') == load_preset(CPU8)
  assert preset_to_record('tpu_configs/cpu_8.py') == str(PRESET_DIR / 'cpu_8.py')  # what the workdir records
  assert load_config_file('lvm/configs/vqlm_7b.py:vqlm_3b') == load_config_file(ROOT / 'lvm/configs/vqlm_7b.py', 'vqlm_3b')
  (tmp_path / 'lvm/configs').mkdir(parents=True)
  (tmp_path / 'lvm/configs/tiny.py').write_text((ROOT / 'lvm/configs/tiny.py').read_text().replace(
      'steps=300', 'steps=7'))
  assert load_config_file('lvm/configs/tiny.py').train.steps == 7
  with pytest.raises(ConfigError, match='config file not found: lvm/configs/tinny.py'):
    load_config_file('lvm/configs/tinny.py')


def test_every_shipped_config_loads_as_the_job_that_takes_it():
  """Each file in attrib/configs and lvm/configs loads, validates, and is the config its job expects
  (fastgda_coco.py, the paper's COCO recipe, was loaded by no test); the COCO recipe is the paper's."""
  from attrib.config import DiffusionConfig
  from attrib.fastgda_config import FastGDAConfig
  from lvm.config import LvmConfig
  from lvm.tokenizer_task import TokenizerRunConfig
  expected = {'digits': DiffusionConfig, 'mscoco': DiffusionConfig, 'fastgda_digits': FastGDAConfig,
              'fastgda_coco': FastGDAConfig, 'tiny': LvmConfig, 'vqlm_7b': LvmConfig,
              'tokenizer_tiny': TokenizerRunConfig, 'tokenizer_f16': TokenizerRunConfig}
  files = sorted(p for folder in ('attrib/configs', 'lvm/configs') for p in (ROOT / folder).glob('*.py')
                 if p.stem != '__init__')
  assert sorted(p.stem for p in files) == sorted(expected)
  for path in files:
    load_config_file(path, expect=expected[path.stem])
  # LVM's VQGAN shape (lvm.md §2): 256 px -> 16x16 = 256 tokens from K=8192 codes of D=64.
  f16 = load_config_file(ROOT / 'lvm/configs/tokenizer_f16.py').tokenizer
  assert (f16.image_size, f16.tokens_per_image, f16.codebook_size, f16.latent_channels) == (256, 256, 8192, 64)
  coco = load_config_file(ROOT / 'attrib/configs/fastgda_coco.py')
  # fastgda.md §3: 1280 -> 768 x 3 -> 768, dropout 0.1; AdamW 1e-3, wd 0.01, batch 4096, 10 epochs, p = 0.1.
  assert (coco.feature, coco.embedder.input_dim, coco.embedder.hidden, coco.embedder.output_dim) == (
      'dino+clip_text', 1280, (768, 768, 768), 768)
  assert (coco.embedder.dropout, coco.distill.lr, coco.distill.weight_decay, coco.distill.batch, coco.distill.epochs,
          coco.distill.outlier_probability) == (0.1, 1e-3, 0.01, 4096, 10, 0.1)
