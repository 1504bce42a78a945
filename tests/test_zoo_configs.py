"""Every model family's Fashion-MNIST config learns: its smoke run (the family's own model,
made small, 40 steps on real data) brings the training loss well below where it started."""

import json
import os
import tempfile

import jax
import numpy as np
import pytest

from jaxcnn import config as config_lib
from jaxcnn import train

FMNIST = os.environ.get('JAXCNN_FMNIST_DIR', '/usr/share/datasets/fashion-mnist')
jax.config.update(
    'jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(), 'jaxcnn_test_xla_cache')
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

ZOO_CONFIGS = sorted(
    p.stem
    for p in config_lib.REPO_CONFIGS.glob('*_fmnist.py')
    if 'zoo_fmnist_config(' in p.read_text()
)


def test_every_zoo_config_is_found():
    assert len(ZOO_CONFIGS) >= 1


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
@pytest.mark.parametrize('name', ZOO_CONFIGS)
def test_family_config_learns_on_fashion_mnist(name, tmp_path):
    config, _ = config_lib.load_config(f'{name}:smoke')
    family_model = config_lib.load_config(name)[0].model
    assert config.model == family_model  # the smoke run trains the family's own model
    assert train.main(['--config', f'{name}:smoke', '--workdir', str(tmp_path)]) == 0
    records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    losses = [r['loss'] for r in records if r['kind'] == 'train']
    # chance is ln(10) = 2.30; the mean of the last two logged losses must be clearly lower
    # than the first (each logged loss is one batch of 32, hence the average)
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses
