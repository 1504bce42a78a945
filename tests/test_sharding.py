"""Data parallelism: 8 simulated CPU devices and 2 processes agree with one device.

Multi-device runs need XLA_FLAGS before JAX starts and multi-process runs need separate
processes, so those checks run in subprocesses that print JSON.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import jax
import numpy as np
import pytest

from jaxcnn import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.environ.get('JAXCNN_FMNIST_DIR', '/usr/share/datasets/fashion-mnist')
CACHE = os.path.join(tempfile.gettempdir(), 'jaxcnn_test_xla_cache')
needs_data = pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}'
)
SMOKE = [
    '--config',
    'default:smoke',
    '--config.num_steps=6',
    '--config.eval_every_steps=6',
    '--config.checkpoint_every_steps=6',
]


def _env(**extra):
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=CACHE,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        PYTHONPATH=REPO,
    )
    env.pop('XLA_FLAGS', None)
    env.update(extra)
    return env


def _losses(workdir):
    records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    return [r['loss'] for r in records if r['kind'] == 'train']


# -- on this process's single device ----------------------------------------------------------


def test_process_slice_and_host_to_global_on_one_device():
    mesh = sharding.make_mesh()
    assert sharding.process_slice(8) == slice(0, 8)
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    g = sharding.host_to_global({'x': x}, mesh)['x']
    assert g.shape == (8, 3) and g.sharding.spec == jax.sharding.PartitionSpec('data')
    np.testing.assert_array_equal(np.asarray(g), x)
    r = sharding.replicate(x, mesh)
    assert r.sharding.is_fully_replicated


def test_too_many_devices_requested_is_an_error():
    with pytest.raises(ValueError, match='num_devices'):
        sharding.make_mesh(jax.device_count() + 1)


# -- 8 simulated devices ----------------------------------------------------------------------

EIGHT_DEVICES = textwrap.dedent('''
    import json, sys, time
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from jaxcnn import sharding, train
    out = {'devices': jax.device_count()}

    # 1. BatchNorm statistics over the global batch: each device's shard has its own offset,
    #    so per-device statistics would differ from the global ones.
    mesh = sharding.make_mesh()
    x = np.random.default_rng(0).normal(size=(32, 4, 4, 3)).astype(np.float32)
    x += np.repeat(np.arange(8.0), 4)[:, None, None, None] * 10
    bn = nn.BatchNorm(use_running_average=False, momentum=0.0)
    variables = bn.init(jax.random.PRNGKey(0), x[:2])
    step = jax.jit(lambda v, x: bn.apply(v, x, mutable=['batch_stats'])[1])
    stats = step(variables, sharding.host_to_global(x, mesh))['batch_stats']
    out['bn_mean_err'] = float(np.abs(np.asarray(stats['mean']) - x.mean((0, 1, 2))).max())
    out['bn_var_err'] = float(np.abs(np.asarray(stats['var']) - x.var((0, 1, 2))).max())
    out['bn_input_shards'] = len(sharding.host_to_global(x, mesh).addressable_shards)

    # 2. A batch that does not split over 8 devices fails before anything compiles.
    t = time.time()
    try:
      train.main(['--config', 'default:smoke', '--workdir', sys.argv[1] + '/bad',
                  '--config.batch_size=36'])
      out['bad_batch_error'] = None
    except ValueError as e:
      out['bad_batch_error'] = str(e)
    out['bad_batch_seconds'] = time.time() - t

    # 3. The same run on 8 devices and on 1.
    for n in (8, 1):
      args = json.loads(sys.argv[2]) + ['--workdir', f'{sys.argv[1]}/d{n}',
                                        f'--config.num_devices={n}']
      assert train.main(args) == 0
    print('RESULT ' + json.dumps(out))
''')


def test_an_empty_batch_is_one_clear_error():
    mesh = sharding.make_mesh(1)
    for batch in (0, -4):
        with pytest.raises(
            ValueError, match=f'batch_size={batch}: a batch needs at least one example'
        ):
            sharding.check_batch_size(batch, mesh)


@needs_data
def test_eight_devices_match_one_device(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-c', EIGHT_DEVICES, str(tmp_path), json.dumps(SMOKE)],
        cwd=REPO,
        env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.split('RESULT ')[1])
    assert out['devices'] == 8 and out['bn_input_shards'] == 8
    assert out['bn_mean_err'] < 1e-4 and out['bn_var_err'] < 1e-3, out
    assert 'not divisible by the 8 devices' in out['bad_batch_error']
    assert '\n' not in out['bad_batch_error'] and out['bad_batch_seconds'] < 30
    eight, one = _losses(tmp_path / 'd8'), _losses(tmp_path / 'd1')
    assert len(eight) == len(one) == 6
    # Same global batch, same math; only the order of the cross-device sums differs.
    np.testing.assert_allclose(eight, one, rtol=2e-4)
    assert eight[0] == pytest.approx(one[0], rel=1e-6)


# Gradients of one global batch on 1 and on 4 devices, in float64. In float32 they differ by up to
# ~1 % in some leaves (RevNet-38, ResNet-32): reductions over the batch sum in another order on 4
# devices, and a ReLU input within rounding of zero then takes the other side, its one element's
# cotangent 0 or not, which BatchNorm spreads over that whole channel's gradient. Reversible or
# stored activations alike; float64 leaves no input that close to a kink.
DATA_PARALLEL_GRADIENTS = textwrap.dedent('''
    import json, sys
    import jax
    jax.config.update('jax_enable_x64', True)
    import jax.numpy as jnp, numpy as np
    import jaxcnn
    from jaxcnn import sharding
    out = {}
    for name, kw in json.loads(sys.argv[1]):
        model = jaxcnn.create_model(name, dtype=jnp.float64, param_dtype=jnp.float64, **kw)
        x = jnp.asarray(np.random.RandomState(0).randn(8, 16, 16, 3))
        labels = jnp.asarray(np.arange(8) % 10)
        variables = jax.jit(lambda: model.init(jax.random.key(0), x[:1], train=False))()

        def loss(params, x):
            logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                                    mutable=['batch_stats'])
            # cross-entropy in float64 too (the trainer's loss computes it in float32)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        grads = []
        for n in (1, 4):
            mesh = sharding.make_mesh(n)
            rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA_AXIS))
            step = jax.jit(jax.grad(loss), in_shardings=(rep, split), out_shardings=rep)
            grads.append(jax.device_get(step(variables['params'], jax.device_put(x, split))))
        out[name] = max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in
                        zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])))
    print('RESULT ' + json.dumps(out))
''')


def test_one_and_four_devices_give_the_same_gradients():
    """The default recipe's model and RevNet-38 (reversible backward): leaf by leaf, the gradient
    of a global batch split over 4 devices equals the one-device gradient to float64 rounding."""
    models = [('resnet20', {'layers': [2, 2, 2]}), ('revnet38', {})]
    proc = subprocess.run(
        [sys.executable, '-c', DATA_PARALLEL_GRADIENTS, json.dumps(models)],
        cwd=REPO,
        env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=4'),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    worst = json.loads(proc.stdout.split('RESULT ')[1])
    assert set(worst) == {'resnet20', 'revnet38'}
    assert max(worst.values()) < 1e-10, worst


# -- 2 processes ------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@needs_data
def test_two_processes_match_one_process(tmp_path):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                '-m',
                'jaxcnn.train',
                *SMOKE,
                '--workdir',
                str(tmp_path / 'mp'),
                '--config.distributed=true',
                f'--config.coordinator_address=127.0.0.1:{port}',
                '--config.num_processes=2',
                f'--config.process_id={i}',
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    single = subprocess.run(
        [sys.executable, '-m', 'jaxcnn.train', *SMOKE, '--workdir', str(tmp_path / 'sp')],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert single.returncode == 0, single.stderr
    assert '2 device(s) (cpu), 2 process(es)' in outs[0]
    multi, one = _losses(tmp_path / 'mp'), _losses(tmp_path / 'sp')
    assert len(multi) == len(one) == 6
    np.testing.assert_allclose(multi, one, rtol=2e-4)
    results = [json.load(open(tmp_path / d / 'results.json')) for d in ('mp', 'sp')]
    assert results[0]['test_accuracy'] == pytest.approx(results[1]['test_accuracy'], abs=0.01)


def test_cpu_split_into_devices_before_jax_starts():
    """cpu_devices=-1 exposes one XLA device per core (largest count dividing the batch)."""
    code = textwrap.dedent('''
    import json, os, ml_collections
    from jaxcnn import sharding
    cores = len(os.sched_getaffinity(0))
    c = ml_collections.ConfigDict({'cpu_devices': -1, 'batch_size': 6 * cores})
    n = sharding.split_host_cpu(c)
    import jax
    print(json.dumps({'cores': cores, 'set': n, 'devices': jax.device_count(),
                      'async': jax.config.values['jax_cpu_enable_async_dispatch'],
                      'again': sharding.split_host_cpu(c)}))
  ''')
    out = subprocess.run(
        [sys.executable, '-c', code], env=_env(), capture_output=True, text=True, check=True
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r['devices'] == max(r['cores'], 1) and r['again'] == 0  # flags are read once
    # Split devices run one program at a time (two in flight could wait on each other's
    # all-reduce); a single device keeps asynchronous dispatch.
    assert r['async'] == (r['devices'] == 1)
