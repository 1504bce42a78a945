"""Checkpointer: exact round trip of a train state, keep-last-K, and the SIGTERM flag."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn import checkpoint as ckpt_lib
from jaxcnn import sharding
from jaxcnn.train import TrainState


def _state(seed, ema=True):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        'conv': {'kernel': jax.random.normal(k[0], (3, 3, 1, 4))},
        'head': {'fc': {'kernel': jax.random.normal(k[1], (4, 10)), 'bias': jnp.zeros(10)}},
    }
    tx = optax.chain(optax.trace(0.9, nesterov=True), optax.inject_hyperparams(optax.sgd)(0.1))
    opt_state = tx.init(params)
    opt_state = tx.update(params, opt_state, params)[1]  # non-trivial momentum buffers
    return TrainState(
        step=jnp.asarray(seed, jnp.int32),
        params=params,
        batch_stats={'bn': {'mean': jnp.full(4, float(seed)), 'var': jnp.ones(4)}},
        opt_state=opt_state,
        ema_params=params if ema else None,
        rng=k[2],
    )


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('ema', [True, False])
def test_round_trip_is_exact(tmp_path, ema):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    saved = _state(5, ema)
    ckpt.save(5, saved)
    ckpt.wait()
    template = jax.device_put(_state(0, ema), sharding.replicated(sharding.make_mesh()))
    restored = ckpt.restore(template)
    _assert_same(saved, restored)
    assert restored.params['conv']['kernel'].sharding.is_fully_replicated
    ckpt.close()


def test_keeps_last_k_and_resumes_from_latest(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, _state(step))
    ckpt.save(4, _state(99))  # saving a step twice is a no-op, not an error
    ckpt.close()
    assert sorted(map(int, os.listdir(tmp_path))) == [3, 4]
    again = ckpt_lib.Checkpointer(str(tmp_path), keep=2)  # a new run in the same workdir
    assert again.latest_step() == 4
    _assert_same(again.restore(_state(0)), _state(4))
    _assert_same(again.restore(_state(0), step=3), _state(3))
    again.close()


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='No checkpoint'):
        ckpt_lib.Checkpointer(str(tmp_path / 'empty')).restore(_state(0))


def test_stop_signal_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    stop = ckpt_lib.StopSignal()
    assert not stop
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop and stop.received == 'SIGTERM'
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before
