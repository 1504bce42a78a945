"""NF building blocks and models: gammas against the published constants, scaled WS conv,
timm equality with non-zero branch gains, the analytic variance tracking, and a short
end-to-end training run of a small NF-ResNet through the nfnet_f0 recipe."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn.layers.nf import DEEPMIND_GAMMA, ScaledStdConv, activation_gamma, computed_gamma
from jaxcnn.models.nfnet import NFNET_VARIANTS, NFBlock
from helpers import jit_once

FMNIST = os.environ.get('JAXCNN_FMNIST_DIR', '/usr/share/datasets/fashion-mnist')


def test_relu_gamma_equals_closed_form():
    # Var[relu(z)] = E[z^2; z>0] - E[relu z]^2 = 1/2 - 1/(2 pi)
    assert computed_gamma('relu') == pytest.approx((0.5 - 0.5 / math.pi) ** -0.5, rel=1e-9)
    assert computed_gamma('identity') == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize(
    'act', ['relu', 'gelu', 'silu', 'tanh', 'elu', 'sigmoid', 'relu6', 'leaky_relu', 'selu']
)
def test_computed_gamma_agrees_with_published(act):
    # the published values are Monte Carlo estimates: equal to ~5e-4, all slightly above ours
    c, p = computed_gamma(act), DEEPMIND_GAMMA[act]
    assert abs(c / p - 1) < 1e-3, (act, c, p)


def test_gamma_restores_unit_variance():
    z = np.random.RandomState(0).randn(2_000_000)
    y = np.asarray(jax.nn.gelu(jnp.asarray(z), approximate=False)) * activation_gamma('gelu')
    assert y.var() == pytest.approx(1.0, abs=5e-3)
    with pytest.raises(ValueError, match='computed'):
        activation_gamma('mish', 'deepmind')


@pytest.mark.parametrize('eps_mode', ['add', 'max'])
def test_scaled_std_conv_standardises_per_output_unit(eps_mode):
    conv = ScaledStdConv(
        16, 3, eps=1e-4 if eps_mode == 'max' else 1e-5, eps_mode=eps_mode, gamma=2.0
    )
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 64))
    v = conv.init(jax.random.key(1), x)
    k = v['params']['kernel'] * 3.0 + 0.5  # scale/shift of W must not matter
    gain = jnp.arange(1.0, 17.0)
    w = np.asarray(conv.standardized_kernel(k, gain))
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0, atol=1e-6)
    fan_in = 3 * 3 * 64
    np.testing.assert_allclose(
        np.sqrt(fan_in) * w.std(axis=(0, 1, 2)), 2.0 * np.asarray(gain), rtol=1e-3
    )
    # a unit-variance input gives outputs of variance ~gain^2 * gamma^2 (gain 1 at init)
    y = conv.apply(v, x)
    assert float(jnp.var(y)) == pytest.approx(4.0, rel=0.1)


def test_registry_rows():
    for name, (f, train_px, test_px, drop, count) in NFNET_VARIANTS.items():
        info = jaxcnn.model_info(name)
        assert info.input_size == (train_px, train_px, 3) and f'{test_px} px' in info.reference
        assert info.torch_name == f'timm:dm_nfnet_f{f}' and info.reference_params == count
        m = jaxcnn.create_model(name)
        assert m.depths == tuple(d * (f + 1) for d in (1, 2, 6, 3)) and m.drop_rate == drop
    assert jaxcnn.model_info('nf_resnet50').torch_name == 'timm:nf_resnet50'


def _tiny(**kw):
    base = dict(
        depths=(2, 3),
        channels=(32, 64),
        stem='cifar',
        stem_width=16,
        group_size=8,
        num_features=0,
        num_classes=10,
        scan_blocks=False,
    )
    return jaxcnn.create_model('nfnet_f0', **{**base, **kw})


def test_blocks_are_identity_at_init_and_betas_track_expected_variance():
    model = _tiny(alpha=0.3)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    v = jit_once(model.init)(jax.random.key(1), x)
    _, st = jit_once(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates'])
    )(v, x)
    out = {
        f'{k}/{b}': np.asarray(blk['__call__'][0])
        for k, stage in st['intermediates'].items()
        if k.startswith('stages')
        for b, blk in stage.items()
        if b.isdigit()
    }
    np.testing.assert_array_equal(out['stages_0/1'], out['stages_0/0'])  # skip_gain = 0
    np.testing.assert_array_equal(out['stages_1/2'], out['stages_1/1'])
    assert float(v['params']['stages_0']['1']['skip_gain']) == 0.0
    # beta_i = 1/sqrt(expected var): 1, 1+a^2 | carried into the transition, then reset to 1+a^2
    a2 = 0.3**2
    expected = [1.0, 1 + a2, 1 + 2 * a2, 1 + a2, 1 + 2 * a2]
    betas = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, NFBlock) and context.method_name == '__call__':
            betas.append(context.module.beta)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.apply(v, x))
    np.testing.assert_allclose(betas, [e**-0.5 for e in expected], rtol=1e-12)


def test_signal_prop_command_rejects_bad_input_in_one_line(capsys):
    from jaxcnn import signal_prop

    with pytest.raises(SystemExit):
        signal_prop.main(['nfnet_f0', '--batch', '0'])
    assert capsys.readouterr().err.strip().endswith('argument --batch: must be at least 1, got 0')
    with pytest.raises(ValueError, match="unknown model 'nfnet_f9'"):
        signal_prop.main(['nfnet_f9'])


def test_measured_stream_variance_follows_the_analytic_one():
    """With the branch gains un-zeroed, the variance of the residual stream grows by ~alpha^2 per
    block, as beta assumes (single-stage model, unit-variance input, wide enough to average)."""
    from jaxcnn.signal_prop import _unzero

    model = _tiny(
        depths=(4,), channels=(256,), stem_width=256, group_size=32, se_ratio=0.0, alpha=0.5
    )
    x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
    v = {'params': _unzero(jit_once(model.init)(jax.random.key(1), x)['params'])}
    _, st = jit_once(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates'])
    )(v, x)
    var = [
        float(
            np.var(
                np.asarray(st['intermediates']['stages_0'][str(b)]['__call__'][0]), axis=(0, 1, 2)
            ).mean()
        )
        for b in range(4)
    ]
    stem_var = float(
        np.var(np.asarray(st['intermediates']['stem_conv']['__call__'][0]), axis=(0, 1, 2)).mean()
    )
    growth = np.diff([stem_var] + var)
    np.testing.assert_allclose(growth[1:], 0.25, rtol=0.35)


def _stack_stages(params):
    """Unrolled params -> the scanned layout: stages_s/b (b >= 1) stacked under
    stages_s/stacked/block (block b at index b - 1); stages_s/0 stays unrolled."""
    out = {}
    for k, val in params.items():
        blocks = (
            sorted((int(b), sub) for b, sub in val.items() if b.isdigit())
            if k.startswith('stages_')
            else []
        )
        if len(blocks) > 1:
            rest = [sub for _, sub in blocks[1:]]
            out[k] = {
                '0': blocks[0][1],
                'stacked': {'block': jax.tree.map(lambda *xs: jnp.stack(xs), *rest)},
            }
        else:
            out[k] = val
    return out


@pytest.mark.parametrize('name', ['nfnet_f0', 'nf_resnet50'])
def test_scanned_stages_are_the_same_function(name):
    """scan_blocks (on for every registered NF model) runs blocks 2..n of a stage as one nn.scan
    (stages_s/stacked/block) with each block's beta and drop-path rate as scanned inputs: every
    block sees the same beta and rate as unrolled, and the logits from the same (stacked)
    weights are the same, with every branch gain non-zero so that each beta counts."""
    from helpers import abstract_variables, random_variables

    kw = dict(
        depths=(1, 3, 4),
        channels=(32, 64, 64),
        stem_width=16,
        num_classes=10,
        alpha=0.3,
        drop_path_rate=0.3,
    )
    kw.update(dict(group_size=8, num_features=32) if name == 'nfnet_f0' else {})
    unrolled = jaxcnn.create_model(name, **kw, scan_blocks=False)
    scanned = jaxcnn.create_model(name, **kw)
    assert scanned.scan_blocks
    v = random_variables(unrolled, (2, 32, 32, 3))
    gains = [
        g
        for path, g in jax.tree_util.tree_leaves_with_path(v['params'])
        if path[-1].key in ('gain', 'skip_gain')
    ]
    assert len(gains) > 20 and all(np.all(np.asarray(g) != 0) for g in gains)
    sv = {'params': _stack_stages(v['params'])}
    assert sv['params']['stages_2']['stacked']['block']['conv1']['kernel'].shape[0] == 3
    assert jax.tree.structure(sv) == jax.tree.structure(abstract_variables(scanned, (2, 32, 32, 3)))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)

    def run(model, variables):
        seen = []

        def record(next_fun, args, kwargs, context):
            m = context.module
            if isinstance(m, NFBlock) and context.method_name == '__call__':
                jax.debug.callback(
                    lambda b, r: seen.append((float(b), float(r))),
                    jnp.float32(m.beta),
                    jnp.float32(m.drop_path),
                    ordered=True,
                )
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            logits = jit_once(model.apply)(variables, x)
        jax.effects_barrier()
        return np.asarray(logits), np.array(seen)

    a, seen_a = run(unrolled, v)
    b, seen_b = run(scanned, sv)
    assert seen_a.shape == seen_b.shape == (8, 2)
    np.testing.assert_allclose(seen_b, seen_a, rtol=1e-6)
    assert seen_a[1:, 1].min() > 0 and len(set(seen_a[:, 0])) > 2  # non-trivial rates and betas
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize(
    'name,torch_name', [('nfnet_f0', 'dm_nfnet_f0'), ('nf_resnet50', 'nf_resnet50')]
)
def test_logits_match_timm_with_nonzero_branch_gains(name, torch_name):
    """test_convert covers every twin at init, where every branch is multiplied by a zero gain;
    here gains are random so the branches, SE and the odd-size SAME padding all count."""
    torch = pytest.importorskip('torch')
    timm = pytest.importorskip('timm')
    from jaxcnn import convert

    torch.manual_seed(0)
    ref = timm.create_model(torch_name).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith('gain'):
                p.uniform_(0.5, 1.5)
    variables = convert.from_torch(name, ref.state_dict())
    model = jaxcnn.create_model(name)
    x = np.random.RandomState(0).randn(2, 3, 33, 33).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    got = np.asarray(
        jit_once(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    )
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
def test_small_nf_resnet_trains_through_the_nfnet_recipe(tmp_path):
    """The nfnet_f0 recipe (Nesterov SGD, AGC, EMA, label smoothing, dropout, stochastic depth)
    on a small NF-ResNet for a few steps: it runs, the losses are finite, the config is saved."""
    from jaxcnn import train

    cfg = tmp_path / 'nf_small.py'
    cfg.write_text(
        'from ml_collections import ConfigDict\n'
        'from jaxcnn.config import load_config\n'
        'def get_config(arg=None):\n'
        "  c, _ = load_config('nfnet_f0:smoke')\n"
        "  c.model = 'nf_resnet50'\n"
        '  c.model_kwargs = ConfigDict(dict(depths=(1, 1), channels=(32, 64), stem="cifar", '
        'stem_width=16, drop_rate=0.2, drop_path_rate=0.25))\n'
        '  c.num_steps = 6\n'
        '  c.eval_every_steps = 6\n'
        '  c.checkpoint_every_steps = 6\n'
        '  return c\n'
    )
    assert train.main(['--config', str(cfg), '--workdir', str(tmp_path / 'run')]) == 0
    records = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
    losses = [r['loss'] for r in records if r['kind'] == 'train']
    assert len(losses) >= 6 and np.isfinite(losses).all()
    assert any(r['kind'] != 'train' and np.isfinite(r.get('accuracy', np.nan)) for r in records)
    saved = json.load(open(tmp_path / 'run' / 'config.json'))
    assert saved['model'] == 'nf_resnet50' and saved['optim']['agc_clip'] == 0.01


def test_agc_step_on_scanned_stages_equals_unrolled():
    """The nfnet_f0 recipe's optimiser (AGC, decay without gains/biases, Nesterov) applied to a
    scanned NFNet updates every stacked block exactly as it updates the unrolled blocks."""
    from helpers import random_variables
    from jaxcnn import optim
    from jaxcnn.config import load_config

    kw = dict(
        depths=(1, 3),
        channels=(32, 64),
        stem_width=16,
        num_classes=10,
        group_size=8,
        num_features=32,
    )
    unrolled = jaxcnn.create_model('nfnet_f0', **kw, scan_blocks=False)
    v = random_variables(unrolled, (2, 32, 32, 3))
    rng = np.random.RandomState(1)
    # gradients over several decades per leaf, so that AGC clips some units and not others
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.randn(*p.shape) * 10.0 ** rng.uniform(-3, 1), jnp.float32),
        v['params'],
    )
    config, _ = load_config('nfnet_f0')
    assert config.optim.agc_clip > 0 and config.optim.weight_decay > 0
    config.schedule.warmup_epochs = 0.0  # a non-zero learning rate at the first step

    def step(params, grads):
        tx, _ = optim.build_optimizer(config, params, 10, 100, 256)
        updates, _ = tx.update(grads, tx.init(params), params)
        return updates

    want = _stack_stages(step(v['params'], grads))
    got = step(_stack_stages(v['params']), _stack_stages(grads))
    assert 'stacked' in got['stages_1'] and '1' not in got['stages_1']
    assert np.abs(np.asarray(got['stages_1']['stacked']['block']['conv1']['kernel'])).max() > 0
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-9, err_msg=jax.tree_util.keystr(path))
