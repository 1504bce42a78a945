"""FractalNet (Larsson et al. 2017): the expansion rule, join-by-mean, drop-path (local and
global sampling) and the single-column switch, on narrow networks; the registered count by hand."""

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import kernels
from helpers import abstract_variables, random_variables, jit_once
from jaxcnn.models.fractalnet import (
    ConvBNReLU,
    FractalBlock,
    FractalNet,
    fractal_depth,
    global_drop_mask,
    join,
    local_drop_mask,
)

X = jnp.asarray(np.random.RandomState(0).randn(4, 8, 8, 3), jnp.float32)


def block_variables(columns, width=4, x=X, seed=0):
    block = FractalBlock(width, columns)
    return block, random_variables(block, x.shape, seed=seed)


def conv_apply(variables, name, x, train=False):
    """One conv layer of a block, applied on its own with that layer's variables."""
    sub = {'params': variables['params'][name], 'batch_stats': variables['batch_stats'][name]}
    if train:
        return ConvBNReLU(variables['params'][name]['conv']['kernel'].shape[-1]).apply(
            sub, x, True, mutable=['batch_stats']
        )[0]
    return ConvBNReLU(variables['params'][name]['conv']['kernel'].shape[-1]).apply(sub, x)


def longest_conv_path(jaxpr, in_depths):
    """Most convolutions on any path from an input to each output of a jaxpr (into sub-jaxprs)."""
    depth = {v: d for v, d in zip(jaxpr.invars, in_depths)}
    get = lambda v: depth.get(v, 0) if isinstance(v, jcore.Var) else 0
    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        subs = [p for p in eqn.params.values() if isinstance(p, (jcore.Jaxpr, jcore.ClosedJaxpr))]
        if subs:
            sub = subs[0].jaxpr if isinstance(subs[0], jcore.ClosedJaxpr) else subs[0]
            outs = longest_conv_path(sub, ins[len(ins) - len(sub.invars) :])
        else:
            d = max(ins, default=0) + (eqn.primitive.name == 'conv_general_dilated')
            outs = [d] * len(eqn.outvars)
        depth.update(zip(eqn.outvars, outs))
    return [get(v) for v in jaxpr.outvars]


@pytest.mark.parametrize('columns', [1, 2, 3, 4])
def test_expansion_rule_depth_and_columns(columns):
    block, v = block_variables(columns)
    # column j holds 2^j convolutions: 2^C - 1 in all
    names = sorted(v['params'])
    for j in range(columns):
        assert [n for n in names if n.startswith(f'col{j}_')] == [
            f'col{j}_conv{i}' for i in range(2**j)
        ]
    assert len(names) == 2**columns - 1
    # the longest input->output path through the traced block has 2^(C-1) convolutions
    with kernels.use(kernels.PLAIN):  # convolutions as lax's primitive
        jaxpr = jax.make_jaxpr(lambda x: block.apply(v, x))(X).jaxpr
    assert longest_conv_path(jaxpr, [0] * len(jaxpr.invars)) == [2 ** (columns - 1)]
    assert fractal_depth(5, columns) == 5 * 2 ** (columns - 1)


def test_registered_depth_is_20():
    model = jaxcnn.create_model('fractalnet20')
    assert fractal_depth(len(model.widths), model.columns) == 20


def test_join_is_the_mean_of_its_branches():
    """f_3 by hand from its conv layers: the inner join merges columns 1-2 after two layers,
    the last merges columns 0-2; every join is a plain mean with drop-path off."""
    block, v = block_variables(3)
    c = lambda name, x: conv_apply(v, name, x)
    inner = (c('col2_conv1', c('col2_conv0', X)) + c('col1_conv0', X)) / 2
    expected = (
        c('col2_conv3', c('col2_conv2', inner)) + c('col1_conv1', inner) + c('col0_conv0', X)
    ) / 3
    np.testing.assert_allclose(block.apply(v, X), expected, rtol=1e-5, atol=1e-5)
    # the same in train mode (batch statistics), where no drop plan means no drop-path
    out, _ = block.apply(v, X, True, mutable=['batch_stats'])
    ct = lambda name, x: conv_apply(v, name, x, train=True)
    inner = (ct('col2_conv1', ct('col2_conv0', X)) + ct('col1_conv0', X)) / 2
    expected = (
        ct('col2_conv3', ct('col2_conv2', inner)) + ct('col1_conv1', inner) + ct('col0_conv0', X)
    ) / 3
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_join_with_mask_averages_the_active_inputs():
    xs = [jnp.full((1, 2), float(i)) for i in (1, 2, 6)]
    np.testing.assert_allclose(join(xs), 3.0)
    np.testing.assert_allclose(join(xs, jnp.array([True, False, True])), 3.5)
    np.testing.assert_allclose(join(xs, jnp.array([False, True, False])), 2.0)


def test_local_drop_path_keeps_at_least_one_input():
    keys = jax.random.split(jax.random.key(0), 2000)
    for rate in (0.15, 0.5, 0.9, 1.0):
        masks = np.asarray(jax.vmap(lambda k: local_drop_mask(k, 3, rate))(keys))
        assert masks.any(axis=1).all(), rate
        if rate == 1.0:
            assert (masks.sum(axis=1) == 1).all()  # exactly the one forced survivor
            assert set(np.argmax(masks, 1)) == {0, 1, 2}  # chosen uniformly among the inputs
        if rate == 0.15:
            assert abs(masks.mean() - 0.85) < 0.02  # otherwise independent Bernoulli keeps


def test_local_drop_path_in_a_block_leaves_one_branch_at_rate_one():
    # everything dropped: each join passes exactly one of its inputs through
    block, v = block_variables(2)
    c = lambda name, x: conv_apply(v, name, x, train=True)
    branches = [c('col1_conv1', c('col1_conv0', X)), c('col0_conv0', X)]
    for seed in range(6):
        out, _ = block.apply(
            v,
            X,
            True,
            (jnp.array(False), jnp.array(0), 1.0),
            rngs={'dropout': jax.random.key(seed)},
            mutable=['batch_stats'],
        )
        matches = [np.allclose(out, b, rtol=1e-4, atol=1e-4) for b in branches]
        assert sum(matches) == 1


def test_global_drop_mask_selects_the_column():
    np.testing.assert_array_equal(global_drop_mask([0, 1, 2], 1), [False, True, False])
    # a join the chosen column does not cross keeps everything (its output is unused)
    np.testing.assert_array_equal(global_drop_mask([1, 2], 0), [True, True])


def small_fractalnet(**kw):
    return FractalNet(widths=(4, 4, 4), columns=3, num_classes=5, **kw)


XS = jnp.asarray(np.random.RandomState(1).randn(4, 8, 8, 3), jnp.float32)


def test_global_sampling_computes_exactly_one_column():
    model = small_fractalnet(drop_path_rate=0.15, global_drop_ratio=1.0)
    v = random_variables(model, XS.shape)
    columns = [model.apply(v, XS, True, column=k, mutable=['batch_stats'])[0] for k in range(3)]
    assert not np.allclose(columns[0], columns[1]) and not np.allclose(columns[1], columns[2])
    run = jit_once(
        lambda key: model.apply(v, XS, True, rngs={'dropout': key}, mutable=['batch_stats'])[0]
    )
    chosen = []
    for seed in range(12):
        out = run(jax.random.key(seed))
        matches = [k for k in range(3) if np.allclose(out, columns[k], rtol=1e-4, atol=1e-5)]
        assert len(matches) == 1, (seed, matches)
        chosen += matches
    assert set(chosen) == {0, 1, 2}  # every column gets sampled


def test_local_and_global_sampling_alternate_by_batch():
    model = small_fractalnet(drop_path_rate=0.15)  # global_drop_ratio 0.5
    v = random_variables(model, XS.shape)
    columns = [model.apply(v, XS, True, column=k, mutable=['batch_stats'])[0] for k in range(3)]
    run = jit_once(
        lambda key: model.apply(v, XS, True, rngs={'dropout': key}, mutable=['batch_stats'])[0]
    )
    kinds = []
    for seed in range(40):
        out = run(jax.random.key(seed))
        kinds.append(any(np.allclose(out, c, rtol=1e-4, atol=1e-5) for c in columns))
    # global batches reproduce one column; local ones (almost always) mix several
    assert 8 <= sum(kinds) <= 32, sum(kinds)


def test_single_column_switch_is_the_plain_column():
    model = small_fractalnet()
    v = random_variables(model, XS.shape)
    p, s = v['params'], v['batch_stats']
    for k in range(3):
        x = XS
        for b in range(3):
            blk = {'params': p[f'block{b + 1}'], 'batch_stats': s[f'block{b + 1}']}
            for i in range(2**k):
                x = conv_apply(blk, f'col{k}_conv{i}', x)
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
        expected = x.mean((1, 2)) @ p['head']['fc']['kernel'] + p['head']['fc']['bias']
        np.testing.assert_allclose(model.apply(v, XS, column=k), expected, rtol=1e-4, atol=1e-5)
        # the field and the call argument are the same switch
        np.testing.assert_allclose(
            small_fractalnet(column=k).apply(v, XS), expected, rtol=1e-4, atol=1e-5
        )
    with pytest.raises(ValueError, match='column'):
        model.apply(v, XS, column=3)


def test_without_drop_path_training_needs_no_rng_and_every_conv_learns():
    model = small_fractalnet()
    v = random_variables(model, XS.shape)

    def loss(params):
        out, _ = model.apply({**v, 'params': params}, XS, True, mutable=['batch_stats'])
        return jnp.sum(out**2)

    grads = jit_once(jax.grad(loss))(v['params'])
    for b in range(3):
        for name, g in grads[f'block{b + 1}'].items():
            assert np.abs(np.asarray(g['conv']['kernel'])).sum() > 0, (b, name)


def fractal_hand_count(widths, columns, in_channels=3, num_classes=10):
    """Per block: C convolutions read the block input (one per column), the other 2^C - 1 - C
    read c channels; 3x3 kernels without bias, BN scale + shift; a linear classifier."""
    total, c_in = 0, in_channels
    for c in widths:
        convs = 2**columns - 1
        total += columns * 9 * c_in * c + (convs - columns) * 9 * c * c + convs * 2 * c
        c_in = c
    return total + c_in * num_classes + num_classes


def test_fractalnet20_hand_count():
    model = jaxcnn.create_model('fractalnet20')
    n = jaxcnn.count_params(abstract_variables(model, (1, 32, 32, 3))['params'])
    assert n == fractal_hand_count((64, 128, 256, 512, 512), 3) == 33_724_618
    assert n == jaxcnn.model_info('fractalnet20').reference_params
    # the convolution weights alone: 33.7M, not Table 1's 38.6M (see the module docstring)
    weights = sum(
        3 * 9 * ci * c + 4 * 9 * c * c
        for ci, c in zip((3, 64, 128, 256, 512), (64, 128, 256, 512, 512))
    )
    assert weights == 33_698_880
    # the same rule at C = 4 (40 layers)
    model4 = jaxcnn.create_model('fractalnet20', columns=4)
    assert jaxcnn.count_params(
        abstract_variables(model4, (1, 32, 32, 3))['params']
    ) == fractal_hand_count((64, 128, 256, 512, 512), 4)
