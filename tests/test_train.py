"""End-to-end training on a subset of the real Fashion-MNIST (CPU, small ResNet, few steps).

The runs share a persistent XLA compilation cache, so identical programs compile once.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from jaxcnn import checkpoint as ckpt_lib
from jaxcnn import train
from helpers import tfds_or_skip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.environ.get('JAXCNN_FMNIST_DIR', '/usr/share/datasets/fashion-mnist')
CACHE = os.path.join(tempfile.gettempdir(), 'jaxcnn_test_xla_cache')
jax.config.update('jax_compilation_cache_dir', CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

pytestmark = pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}'
)
SMOKE = ['--config', 'default:smoke']


def run(workdir, *overrides):
    return train.main([*SMOKE, '--workdir', str(workdir), *overrides])


def train_losses(workdir):
    records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    by_step = {r['step']: r['loss'] for r in records if r['kind'] == 'train'}  # last one wins
    return [by_step[s] for s in sorted(by_step)]


def final_params(workdir):
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
    step = ckpt.latest_step()
    state = ckpt.restore_arrays(step)
    ckpt.close()
    return step, state


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    """8 steps of the smoke config, uninterrupted: the reference of several tests."""
    workdir = tmp_path_factory.mktemp('uninterrupted')
    assert run(workdir) == 0
    return workdir


def test_loss_falls_and_outputs_are_written(tmp_path, capsys):
    assert (
        run(
            tmp_path,
            '--config.num_steps=40',
            '--config.train_subset=2048',
            '--config.eval_every_steps=20',
            '--config.log_every_steps=5',
        )
        == 0
    )
    losses = train_losses(tmp_path)
    assert len(losses) >= 8  # every 5 steps, and whenever a checkpoint forces a fetch
    # Chance level is ln(10) = 2.30; 40 steps of a tiny ResNet get well below it.
    assert losses[-1] < 0.75 * losses[0], losses
    results = json.load(open(tmp_path / 'results.json'))
    assert results['test_accuracy'] > 0.4, results  # chance is 0.1
    assert 'Final test accuracy' in capsys.readouterr().out
    for png in ('loss.png', 'accuracy.png', 'lr.png'):
        with open(tmp_path / png, 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    header = open(tmp_path / 'metrics.csv').readline().strip().split(',')
    assert header[:2] == ['step', 'kind'] and {'loss', 'accuracy', 'lr'} <= set(header)
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'tb'))
    assert sorted(map(int, os.listdir(tmp_path / 'checkpoints'))) == [32, 36, 40]  # keep 3


def test_resume_after_preemption_equals_uninterrupted(uninterrupted, tmp_path, capsys):
    assert run(tmp_path, '--config.simulate_preemption_at_step=3') == 0
    out = capsys.readouterr().out
    assert 'Received SIGTERM' in out and 'step 3' in out
    assert final_params(tmp_path)[0] == 3
    assert run(tmp_path) == 0
    assert 'Resumed' in capsys.readouterr().out
    assert train_losses(tmp_path) == train_losses(uninterrupted)
    step_a, a = final_params(uninterrupted)
    step_b, b = final_params(tmp_path)
    assert step_a == step_b == 8
    jax.tree.map(np.testing.assert_array_equal, a['params'], b['params'])
    jax.tree.map(np.testing.assert_array_equal, a['opt_state'], b['opt_state'])
    jax.tree.map(np.testing.assert_array_equal, a['batch_stats'], b['batch_stats'])


def test_a_bad_override_on_resume_leaves_the_run_as_it_was(uninterrupted, tmp_path):
    run_dir = tmp_path / 'run'
    shutil.copytree(uninterrupted, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file()}
    for override, message in [
        ('--config.optim.lr=-0.1', 'config.optim.lr must be > 0'),
        ('--config.batch_size=100000', 'is larger than the'),
    ]:
        with pytest.raises(ValueError, match=message):
            run(run_dir, override)
    after = {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file()}
    assert after == before


def test_sigterm_from_outside_saves_and_exits_zero(tmp_path):
    env = dict(
        os.environ, JAX_COMPILATION_CACHE_DIR=CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0'
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            '-m',
            'jaxcnn.train',
            *SMOKE,
            '--workdir',
            str(tmp_path),
            '--config.num_steps=100000',
            '--config.checkpoint_every_steps=50000',
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / 'metrics.jsonl'
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert 'Received SIGTERM' in out
    saved = int(out.split('saved a checkpoint at step ')[1].split()[0])
    assert saved >= 3 and os.listdir(tmp_path / 'checkpoints') == [str(saved)]
    assert max(json.loads(l)['step'] for l in metrics.read_text().splitlines()) == saved


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, capsys):
    status = run(
        tmp_path,
        '--config.optim.lr=1e6',
        '--config.schedule.name=constant',
        '--config.checkpoint_every_steps=1',
        '--config.num_steps=80',
        '--config.eval_every_steps=1000',
    )
    err = capsys.readouterr().err
    assert status == 1, err
    bad = int(err.split(' at step ')[1].split(';')[0])
    losses = train_losses(tmp_path)
    assert len(losses) == bad - 1 and all(np.isfinite(losses))  # nothing logged from the bad step
    step, state = final_params(tmp_path)
    assert step == bad - 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


def test_missing_dataset_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        run(tmp_path, f'--config.data_dir={tmp_path}/nowhere')
    assert '\n' not in str(e.value) and 'nowhere' in str(e.value)
    assert 'apt-get install dataset-fashion-mnist' in str(e.value)
    assert not os.path.exists(tmp_path / 'checkpoints')  # nothing half-written


def test_tfds_dataset_trains_end_to_end(tmp_path):
    """The host-side TFDS path (decode, augment, per-host batches) through the same trainer."""
    tfds = tfds_or_skip()
    with tfds.testing.mock_data(num_examples=64):
        assert (
            run(
                tmp_path,
                '--config.dataset=tfds:cifar10',
                '--config.image_size=32',
                '--config.test_image_size=32',
                '--config.num_steps=4',
            )
            == 0
        )
    results = json.load(open(tmp_path / 'results.json'))
    assert results['step'] == 4 and 0.0 <= results['test_accuracy'] <= 1.0
    assert len(train_losses(tmp_path)) >= 1 and all(np.isfinite(train_losses(tmp_path)))


def test_stand_in_model_is_logged(capsys):
    from jaxcnn.config import load_config

    config, _ = load_config('nfnet_f0')
    assert train.resolve_model_name(config) in ('nfnet_f0', 'resnet50')
    config.model, config.model_fallback = 'no_such_net', 'resnet20'
    assert train.resolve_model_name(config) == 'resnet20'
    assert 'stand-in' in capsys.readouterr().out
    config.model, config.model_fallback = 'resnet2O', ''
    with pytest.raises(ValueError, match='resnet20'):
        train.resolve_model_name(config)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = train.epoch_permutation(0, 3, 1000)
    assert np.array_equal(a, train.epoch_permutation(0, 3, 1000).copy())
    assert not np.array_equal(a, train.epoch_permutation(0, 4, 1000))
    assert not np.array_equal(a, train.epoch_permutation(1, 3, 1000))
    assert np.array_equal(np.sort(a), np.arange(1000))


def test_bf16_ema_mixup_and_ten_crop_evaluation(tmp_path):
    """bf16 compute with fp32 parameters, EMA, MixUp/CutMix/erasing and 10-crop TTA together."""
    assert (
        run(
            tmp_path,
            '--config.bf16=true',
            '--config.ema_decay=0.9',
            '--config.augment.mixup=0.2',
            '--config.augment.cutmix=1.0',
            '--config.augment.random_erasing=0.5',
            '--config.eval.mode=ten_crop',
            '--config.test_image_size=24',
        )
        == 0
    )
    records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    evals = [r for r in records if r['kind'] == 'eval']
    assert evals and all(0 <= r['accuracy'] <= 1 and np.isfinite(r['loss']) for r in evals)
    assert all(0 <= r['ema_accuracy'] <= 1 for r in evals)
    step, state = final_params(tmp_path)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state['params']))


def test_progressive_phases_follow_algorithm_1_of_efficientnetv2():
    """EfficientNetV2-S's Table 6 schedule (128 -> 300 px, dropout 0.1 -> 0.3, mixup 0) in the
    paper's 4 stages, against numpy's linspace of the same end points."""
    from jaxcnn import config as config_lib
    import jaxcnn

    config, _ = config_lib.load_config('default')
    config.augment.mixup = 0.0
    config.progressive.update(
        dict(stages=4, start_image_size=128, start_drop_rate=0.1, start_mixup=0.0)
    )
    model = jaxcnn.create_model('efficientnetv2_s', drop_rate=0.3)
    phases = train.progressive_phases(config, 1000, 300, model)
    assert [p.start_step for p in phases] == [0, 250, 500, 750]
    assert [p.image_size for p in phases] == [int(round(s)) for s in np.linspace(128, 300, 4)]
    np.testing.assert_allclose([p.drop_rate for p in phases], np.linspace(0.1, 0.3, 4))
    assert [p.mixup for p in phases] == [0.0] * 4
    config.progressive.stages = 0
    assert train.progressive_phases(config, 1000, 300, model) == [train.TrainPhase(0, 300)]


def test_progressive_training_grows_the_image_size(tmp_path, capsys):
    """Two stages, 14 px then 28 px, dropout 0 -> 0.2: both stages train and the run finishes."""
    assert (
        run(
            tmp_path,
            '--config.progressive.stages=2',
            '--config.progressive.start_image_size=14',
            '--config.progressive.start_drop_rate=0',
            '--config.model_kwargs.drop_rate=0.2',
        )
        == 0
    )
    out = capsys.readouterr().out
    assert 'progressive stage 1/2 from step 0: 14px, dropout 0' in out
    assert 'progressive stage 2/2 from step 4: 28px, dropout 0.2' in out
    assert len(train_losses(tmp_path)) == 8 and np.all(np.isfinite(train_losses(tmp_path)))


def test_train_step_feeds_the_model_the_phase_size_and_dropout():
    """The jitted step of a phase resizes the stored 28 px images to the phase's size and runs
    the model built with the phase's dropout (recorded while tracing)."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax
    from jaxcnn import config as config_lib

    seen = []

    class Spy(nn.Module):
        drop_rate: float = 0.5

        @nn.compact
        def __call__(self, x, train=False):
            seen.append((x.shape, self.drop_rate))
            return nn.Dense(10)(x.mean((1, 2)))

    config, _ = config_lib.load_config('default:smoke')
    model = Spy().clone(drop_rate=0.1)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
    seen.clear()
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={},
        opt_state=tx.init(params),
        ema_params=None,
        rng=jax.random.key(1),
    )
    images = jnp.zeros((8, 28, 28, 1), jnp.uint8)
    labels = jnp.arange(8, dtype=jnp.int32) % 10
    step = train.make_train_step(config, model, tx, (0.5,), (0.25,), 14, 10)
    jax.jit(step)(state, (images, labels), {'idx': jnp.arange(4, dtype=jnp.int32)})
    assert seen == [((4, 14, 14, 1), 0.1)]
