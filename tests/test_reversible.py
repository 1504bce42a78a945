"""The reversible coupling and the RevNet / i-RevNet models: inversion, gradients, statistics.

Every comparison is against the same couplings run with ordinary autodiff, which stores
activations (``Stage(reversible=True, recompute=False)``: the same scan and random keys); the
reversible path must give the same gradients and statistics.
"""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxcnn
from helpers import abstract_variables, jit_once
from jaxcnn.layers import batch_norm, conv2d
from jaxcnn.layers.reversible import Coupling, depth_to_space, space_to_depth
from jaxcnn.layers.stage import Stage, stage_blocks
from jaxcnn.models.revnet import IRevNet, RevNet


class Branch(nn.Module):
    """A small F/G: BN-ReLU-conv3x3-dropout (randomness and batch statistics both exercised)."""

    channels: int
    dropout: float = 0.0
    dtype: object = None
    param_dtype: object = jnp.float32
    gain: float = 2.0  # He init; the inversion tests use a smaller gain (see there)

    @nn.compact
    def __call__(self, x, train=False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.relu(batch_norm(train, **kw)(x))
        init = nn.initializers.variance_scaling(self.gain, 'fan_in', 'normal')
        h = conv2d(self.channels, 3, kernel_init=init, **kw)(h)
        return nn.Dropout(self.dropout, deterministic=not train)(h)


class Sequence(nn.Module):
    """``n`` couplings of two Branch instances as a reversible stage, called (x1, x2)."""

    stage: Stage

    def __call__(self, x1, x2, train=False, inverse=False):
        return self.stage((x1, x2), train, inverse)


def sequence(
    channels,
    n,
    reversible,
    dropout=0.0,
    drop_path=0.0,
    dtype=None,
    param_dtype=jnp.float32,
    gain=2.0,
    unroll=1,
):
    branch = dict(
        channels=channels, dropout=dropout, dtype=dtype, param_dtype=param_dtype, gain=gain
    )
    rates = [drop_path * (i + 1) / n for i in range(n)]
    blocks = stage_blocks(
        Coupling,
        [
            dict(branch=Branch, branch_fields=tuple(sorted(branch.items())), drop_path=r)
            for r in rates
        ],
    )
    return Sequence(Stage(blocks, unrolled=0, reversible=True, recompute=reversible, unroll=unroll))


def randomise_stats(variables, seed):
    """Non-trivial running statistics, so eval-mode BN is not the identity."""
    rng = np.random.RandomState(seed)

    def fill(path, x):
        if path[-1].key == 'var':
            return jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype)
        return jnp.asarray(rng.randn(*x.shape) * 0.3, x.dtype)

    return {
        **variables,
        'batch_stats': jax.tree_util.tree_map_with_path(fill, variables['batch_stats']),
    }


def halves(seed, shape, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, shape, dtype), jax.random.normal(k2, shape, dtype)


def angle_deg(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    cos = a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


# ---------------------------------------------------------------------------------------------
# Inversion

DEPTH = 32
# Branch variance gain of the inversion stack: with He init (2.0) 32 random couplings grow the
# activations ~1e5-fold (a trained RevNet's do not); 0.1 keeps them O(10), like a trained net.
GAIN = 0.1


def _inversion_error(dtype):
    x1, x2 = halves(0, (4, 8, 8, 8))
    seq = sequence(8, DEPTH, True, dtype=dtype, gain=GAIN)
    variables = randomise_stats(seq.init(jax.random.key(1), x1, x2), 2)
    x1, x2 = x1.astype(dtype), x2.astype(dtype)
    fwd = jit_once(lambda v, a, b: seq.apply(v, a, b, False))
    inv = jit_once(lambda v, a, b: seq.apply(v, a, b, False, inverse=True))
    y1, y2 = fwd(variables, x1, x2)
    r1, r2 = inv(variables, y1, y2)
    err = max(
        float(jnp.max(jnp.abs(r1.astype(jnp.float32) - x1.astype(jnp.float32)))),
        float(jnp.max(jnp.abs(r2.astype(jnp.float32) - x2.astype(jnp.float32)))),
    )
    scale = max(
        float(jnp.max(jnp.abs(y1.astype(jnp.float32)))),
        float(jnp.max(jnp.abs(y2.astype(jnp.float32)))),
    )
    return err, scale


def test_inversion_error_fp32_deep_stack():
    """32 couplings (64 convolutions) in fp32: each subtraction undoes an addition exactly up to
    one rounding of the running sum, so the error grows at most ~ depth * eps * max|y|.
    Bound: 2 * depth * 2^-23 * max|y| (about 8e-6 relative)."""
    err, scale = _inversion_error(jnp.float32)
    bound = 2 * DEPTH * 2.0**-23 * scale
    assert err <= bound, (err, bound, scale)


def test_inversion_error_bf16_is_measured():
    """bf16 keeps 8 significant bits (eps = 2^-8): the same argument gives ~ depth * eps * max|y|,
    and rounding of F's output in bf16 adds as much again per block, so we only assert
    4 * depth * 2^-8 * max|y| (the loose worst case); the measured value is printed."""
    err, scale = _inversion_error(jnp.bfloat16)
    print(
        f'bf16 inversion error over {DEPTH} couplings: {err:.3g} (max|y| = {scale:.3g}, '
        f'relative {err / scale:.3g})'
    )
    assert err <= 4 * DEPTH * 2.0**-8 * scale, (err, scale)


def test_space_to_depth_is_a_bijection():
    x = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))
    z = space_to_depth(x, 2)
    assert z.shape == (2, 4, 3, 12)
    np.testing.assert_array_equal(depth_to_space(z, 2), x)


# ---------------------------------------------------------------------------------------------
# Gradients: custom VJP == ordinary autodiff


def _grads(seq, variables, x1, x2, key):
    def loss(params, a, b):
        (y1, y2), state = seq.apply(
            {**variables, 'params': params},
            a,
            b,
            True,
            rngs={'dropout': key},
            mutable=['batch_stats'],
        )
        # a loss that mixes both halves non-linearly, so every path carries gradient
        return jnp.sum(jnp.tanh(y1) * y2) + jnp.sum(y2**2) * 0.01, state

    return jit_once(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(variables['params'], x1, x2)


@pytest.mark.parametrize('seed', [0, 1])
def test_gradients_equal_autodiff_with_dropout_and_stochastic_depth(seed):
    rng = np.random.RandomState(seed)
    channels, n = int(rng.choice([4, 8])), int(rng.randint(3, 7))
    dropout, drop_path = float(rng.uniform(0.1, 0.3)), float(rng.uniform(0.2, 0.5))
    x1, x2 = halves(seed, (int(rng.randint(2, 5)), 8, 8, channels))
    rev = sequence(channels, n, True, dropout, drop_path)
    plain = sequence(channels, n, False, dropout, drop_path)
    variables = rev.init(jax.random.key(seed), x1, x2)
    key = jax.random.key(100 + seed)
    (gp, gx1, gx2), state = _grads(rev, variables, x1, x2, key)
    (rp, rx1, rx2), ref_state = _grads(plain, variables, x1, x2, key)

    leaves = jax.tree_util.tree_flatten_with_path(gp)[0]
    assert len(leaves) == len(jax.tree.leaves(rp)) > 0
    pairs = list(zip(leaves, jax.tree.leaves(rp))) + [((('x1',), gx1), rx1), ((('x2',), gx2), rx2)]
    for (path, g), r in pairs:
        scale = float(jnp.max(jnp.abs(r))) + 1e-6
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4 * scale, err_msg=str(path))
        assert angle_deg(g, r) < 1.0, (path, angle_deg(g, r))
    # the batch statistics leave the reversible path exactly as the ordinary one's
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_reversible_pass_passes_check_grads_in_every_mode():
    """jax.test_util.check_grads against finite differences in float64, forward and reverse mode
    to second order (forward over reverse among them), through BN in training mode, dropout and
    stochastic depth (masks fixed by the key)."""
    with jax.enable_x64(True):
        seq = sequence(
            2, 2, True, dropout=0.2, drop_path=0.3, dtype=jnp.float64, param_dtype=jnp.float64
        )
        x1, x2 = halves(3, (3, 4, 4, 2), jnp.float64)
        variables = seq.init(jax.random.key(0), x1, x2)
        stats = variables['batch_stats']

        def f(params, a, b):
            (y1, y2), _ = seq.apply(
                {'params': params, 'batch_stats': stats},
                a,
                b,
                True,
                rngs={'dropout': jax.random.key(7)},
                mutable=['batch_stats'],
            )
            return y1, y2

        check_grads(
            f, (variables['params'], x1, x2), order=2, modes=['fwd', 'rev'], atol=1e-5, rtol=1e-5
        )


def test_batch_stats_updated_once_like_autodiff():
    """One training step moves every running mean by exactly one momentum update: the
    reversible path's new statistics equal the ordinary path's, and differ from the start."""
    x1, x2 = halves(5, (6, 8, 8, 4))
    rev, plain = sequence(4, 4, True), sequence(4, 4, False)
    variables = randomise_stats(rev.init(jax.random.key(0), x1, x2), 3)
    (_, _, _), state = _grads(rev, variables, x1, x2, jax.random.key(0))
    (_, _, _), ref_state = _grads(plain, variables, x1, x2, jax.random.key(0))
    # first block's F sees x2 itself: its new mean is 0.9 * old + 0.1 * batch mean of x2
    f_stats = lambda v: v['stage']['stacked']['block']['f']['BatchNorm_0']['mean']
    old = f_stats(variables['batch_stats'])[0]
    expected = 0.9 * old + 0.1 * jnp.mean(x2, axis=(0, 1, 2))
    np.testing.assert_allclose(f_stats(state['batch_stats'])[0], expected, rtol=1e-5, atol=1e-6)
    for a, b, before in zip(
        jax.tree.leaves(state),
        jax.tree.leaves(ref_state),
        jax.tree.leaves(variables['batch_stats']),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert not np.allclose(a, before)


def test_revnet_model_gradients_equal_autodiff():
    """A whole (narrow) RevNet with the non-reversible downsampling units: reversible and
    ordinary training (scanned couplings) give the same gradients. (With dropout the two draw
    different masks; the couplings' randomness is checked above with the same keys.)"""
    kw = dict(layers=(1, 3), widths=(8, 16), stem_width=8)
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    labels = jnp.array([0, 3, 5, 9])
    rev, plain = RevNet(**kw), RevNet(**kw, reversible=False)
    variables = jit_once(rev.init)(jax.random.key(1), x)

    def grads(model):
        def loss(params):
            logits, state = model.apply(
                {**variables, 'params': params},
                x,
                train=True,
                rngs={'dropout': jax.random.key(2)},
                mutable=['batch_stats'],
            )
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), state

        return jit_once(jax.grad(loss, has_aux=True))(variables['params'])

    (g, s), (r, rs) = grads(rev), grads(plain)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(r)):
        np.testing.assert_allclose(
            a,
            b,
            rtol=1e-3,
            atol=1e-5 + 1e-4 * float(jnp.max(jnp.abs(b))),
            err_msg=jax.tree_util.keystr(path),
        )
        if float(jnp.max(jnp.abs(b))) > 0:
            assert angle_deg(a, b) < 1.0, jax.tree_util.keystr(path)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(rs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# i-RevNet


def test_irevnet_inverse_reconstructs_input():
    """Odd and even stage lengths (half-couplings unrolled and paired), BN with running stats."""
    # each stage's width is 4x the previous half: the 2x2 squeeze quadruples channels
    model = IRevNet(blocks=(2, 3), channels=(24, 96), num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = randomise_stats(jit_once(model.init)(jax.random.key(1), x), 4)
    z = jit_once(lambda v, x: model.apply(v, x, features_only=True))(variables, x)
    assert z.size == x.size  # bijective: nothing added, nothing dropped
    back = jit_once(lambda v, z: model.apply(v, z, method=IRevNet.inverse))(variables, z)
    np.testing.assert_allclose(back, x, atol=2e-4 * float(jnp.max(jnp.abs(z))))
    logits = model.apply(variables, x)
    assert logits.shape == (2, 10)


def test_irevnet_injective_padding_is_undone():
    model = IRevNet(blocks=(2, 2), channels=(64, 256), in_pad=20, num_classes=10)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = jit_once(model.init)(jax.random.key(1), x)
    z = model.apply(variables, x, features_only=True)
    assert z.size == x.size + 2 * 4 * 4 * 20  # 20 zero channels after the 2x2 squeeze
    back = model.apply(variables, z, method=IRevNet.inverse)
    np.testing.assert_allclose(back, x, atol=1e-4)


def irevnet_closed_form(blocks, channels, init_ds=2, in_channels=3, num_classes=1000):
    """i-RevNet parameters by hand: per half-block F = [BN] conv3x3 c_in->c/4, BN, conv3x3
    c/4->c/4, BN, conv3x3 c/4->c (no biases); final BN on 2c and the linear classifier."""
    half = in_channels * init_ds**2 // 2
    total = 0
    for s, (n, c) in enumerate(zip(blocks, channels)):
        mid = c // 4
        for b in range(n):
            c_in = half if b == 0 else c
            first = s == 0 and b == 0
            total += (0 if first else 2 * c_in) + 9 * c_in * mid + 2 * mid + 9 * mid * mid
            total += 2 * mid + 9 * mid * c
        half = c
    return total + 2 * (2 * half) + 2 * half * num_classes + num_classes


def test_irevnet_count_equals_hand_count():
    model = jaxcnn.create_model('irevnet')
    n = jaxcnn.count_params(abstract_variables(model, (1, 224, 224, 3))['params'])
    assert n == irevnet_closed_form(model.blocks, model.channels) == 125_120_356


def test_revnet38_se_count_is_revnet38_plus_se():
    """SE on c channels: two 1x1 convs with bias through rd = max(8, c/16 rounded to 8)."""
    count = lambda name: jaxcnn.count_params(
        abstract_variables(jaxcnn.create_model(name), (1, 32, 32, 3))['params']
    )
    se = lambda c: 2 * c * 8 + 8 + c
    # 2 reversible units per stage, an SE in each of F and G; half widths 16, 32, 56
    assert count('revnet38_se') - count('revnet38') == 4 * (se(16) + se(32) + se(56))


# ---------------------------------------------------------------------------------------------
# Training end to end

FMNIST = os.environ.get('JAXCNN_FMNIST_DIR', '/usr/share/datasets/fashion-mnist')


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
def test_revnet38_fmnist_smoke_trains(tmp_path):
    import json
    from jaxcnn import train

    assert (
        train.main(
            [
                '--config',
                'revnet38_fmnist:smoke',
                '--workdir',
                str(tmp_path),
                '--config.num_steps=16',
            ]
        )
        == 0
    )
    records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    losses = [r['loss'] for r in records if r['kind'] == 'train']
    config = json.load(open(tmp_path / 'config.json'))
    assert config['model'].startswith('revnet')
    assert losses[-1] < losses[0], losses


def test_unrolled_scan_gives_the_same_gradients():
    """scan_unroll only changes how XLA lays the loop out: the reversible gradients of an
    unrolled sequence equal the rolled one's (and the inverse still inverts)."""
    x1, x2 = halves(11, (4, 8, 8, 4))
    rolled = sequence(4, 3, True, dropout=0.1, drop_path=0.2)
    unrolled = sequence(4, 3, True, dropout=0.1, drop_path=0.2, unroll=3)
    variables = randomise_stats(rolled.init(jax.random.key(0), x1, x2), 2)
    (g, gx1, gx2), _ = _grads(rolled, variables, x1, x2, jax.random.key(4))
    (u, ux1, ux2), _ = _grads(unrolled, variables, x1, x2, jax.random.key(4))
    for a, b in zip(jax.tree.leaves((g, gx1, gx2)), jax.tree.leaves((u, ux1, ux2))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    y1, y2 = unrolled.apply(variables, x1, x2, False)
    r1, r2 = unrolled.apply(variables, y1, y2, False, inverse=True)
    np.testing.assert_allclose(r1, x1, atol=1e-4)
    np.testing.assert_allclose(r2, x2, atol=1e-4)
