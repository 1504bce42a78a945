"""Learning-rate finder: the suggestion logic on known curves, and a real sweep."""

import json
import os
import tempfile

import jax
import numpy as np
import pytest

from jaxcnn import lr_find

FMNIST = os.environ.get('JAXCNN_FMNIST_DIR', '/usr/share/datasets/fashion-mnist')
jax.config.update(
    'jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(), 'jaxcnn_test_xla_cache')
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)


def test_sweep_is_exponential_between_the_bounds():
    lrs = [lr_find.sweep_lr(s, 1e-5, 1.0, 11) for s in range(11)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diff(np.log10(lrs)), 0.5)


def test_smoothing_is_bias_corrected():
    np.testing.assert_allclose(lr_find.smooth([3.0] * 20, 0.05), 3.0)  # no pull towards 0


def test_suggestion_on_a_known_curve():
    # Loss falls fastest (in log lr) at lr = 1e-2, bottoms out at 1e-1, then explodes.
    lrs = np.logspace(-5, 0, 101)
    u = np.log10(lrs)
    loss = 2.0 - np.tanh(2 * (u + 2)) + np.where(u > -1, 20 * (u + 1) ** 2, 0)
    steepest, min10 = lr_find.suggest(lrs, loss)
    assert steepest == pytest.approx(1e-2, rel=0.15)
    i_min = int(np.argmin(loss))
    assert min10 == pytest.approx(lrs[i_min] / 10)


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
def test_sweep_writes_plot_and_suggests_a_finite_lr(tmp_path, capsys):
    assert (
        lr_find.main(
            [
                '--config',
                'default:smoke',
                '--workdir',
                str(tmp_path),
                '--steps',
                '60',
                '--min_lr',
                '1e-4',
                '--max_lr',
                '100',
            ]
        )
        == 0
    )
    with open(tmp_path / 'lr_find.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    result = json.load(open(tmp_path / 'lr_find.json'))
    assert 1e-4 <= result['suggested_lr'] <= 100 and np.isfinite(result['suggested_lr'])
    # lr 100 is far past what this model tolerates: the sweep must stop early on divergence.
    assert len(result['loss']) < 60
    assert 'diverged' in capsys.readouterr().out
