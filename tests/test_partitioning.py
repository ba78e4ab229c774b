"""XLA's SPMD partitioner finds an efficient layout for every tensor of the training steps on the
(data 2, fsdp 2, tensor 2) mesh: no full rematerialisation (replicate, then re-slice) anywhere."""
import pytest

from core.compile_check import remat_warnings
from tests.helpers import CPU8, ROOT


@pytest.mark.parametrize('kind,config', [('lvm', 'lvm/configs/tiny.py'), ('diffusion', 'attrib/configs/digits.py')])
def test_train_step_compiles_without_full_rematerialisation(kind, config):
  warnings = remat_warnings(kind, str(ROOT / config), CPU8)
  assert not warnings, '\n'.join(w[:400] for w in warnings)
