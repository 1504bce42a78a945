"""Xception: a hand count of Chollet 2017's Fig. 5, separable convolutions everywhere after the
stem, the flows' map sizes, identity shortcuts in the middle flow, and the input limit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxcnn
from helpers import abstract_variables, random_variables, jit_once

FLOWS = ('entry_flow', 'middle_flow', 'exit_flow')  # the model's three stages, in order


def sep(c_in, c_out):
    return 9 * c_in + c_in * c_out  # depthwise 3x3 + pointwise 1x1, no biases


def bn(c):
    return 2 * c


def xception_hand_count(middle_repeats=8, num_classes=1000):
    """Chollet 2017, Fig. 5, block by block (timm legacy_xception's widening order)."""
    total = 3 * 3 * 3 * 32 + bn(32) + 3 * 3 * 32 * 64 + bn(64)  # stem
    # (in, out, separable convs, downsampling, widen in the first conv)
    blocks = (
        [(64, 128, 2, True, True), (128, 256, 2, True, True), (256, 728, 2, True, True)]
        + [(728, 728, 3, False, True)] * middle_repeats
        + [(728, 1024, 2, True, False)]
    )
    for c_in, c_out, reps, down, grow_first in blocks:
        widths = [c_in] + ([c_out] * reps if grow_first else [c_in] * (reps - 1) + [c_out])
        total += sum(sep(a, b) + bn(b) for a, b in zip(widths, widths[1:]))
        if down or c_in != c_out:
            total += c_in * c_out + bn(c_out)  # 1x1 shortcut + BN
    total += sep(1024, 1536) + bn(1536) + sep(1536, 2048) + bn(2048)
    return total + 2048 * num_classes + num_classes


def n_params(size=299, **kw):
    model = jaxcnn.create_model('xception', **kw)
    return jaxcnn.count_params(abstract_variables(model, (1, size, size, 3))['params'])


def test_hand_count_equals_timm():
    assert xception_hand_count() == n_params() == 22_855_952  # timm legacy_xception
    assert n_params(64, middle_repeats=2) == xception_hand_count(middle_repeats=2)


def test_separable_convolutions_throughout():
    p = traverse_util.flatten_dict(
        abstract_variables(jaxcnn.create_model('xception'), (1, 299, 299, 3))['params'], sep='/'
    )
    kernels = {k: v.shape for k, v in p.items() if k.endswith('kernel') and len(v.shape) == 4}
    full = sorted(k for k, s in kernels.items() if s[0] > 1 and s[2] > 1)
    assert full == ['conv1/kernel', 'conv2/kernel']  # only the stem convolves fully
    depthwise = [k for k, s in kernels.items() if s[0] > 1 and k not in full]
    assert len(depthwise) == 3 * 2 + 8 * 3 + 2 + 2 == 34
    for k in depthwise:
        assert k.endswith('/conv1/kernel') and kernels[k][:3] == (3, 3, 1)  # one filter per channel
        pointwise = kernels[k.replace('/conv1/', '/pointwise/')]
        assert pointwise[:3] == (1, 1, kernels[k][3])


def test_middle_flow_shortcuts_are_identities():
    params = abstract_variables(jaxcnn.create_model('xception'), (1, 64, 64, 3))['params']
    # blocks 1-12 through the three flows (entry_flow/0-2, middle_flow/0-7, exit_flow/0)
    blocks = [params[flow][str(b)] for flow in FLOWS for b in range(len(params[flow]))]
    assert len(blocks) == 12
    with_projection = [i + 1 for i, block in enumerate(blocks) if 'skip' in block]
    assert with_projection == [1, 2, 3, 12]


def test_flow_map_sizes_at_299():
    # Fig. 5: entry flow 299 -> 19x19x728, middle flow keeps it, exit flow 10x10x1024 -> 2048
    model = jaxcnn.create_model('xception')
    v = abstract_variables(model, (1, 299, 299, 3))
    # blocks 1, 2, 3, 11 and 12 of Fig. 5, by their place in the flows
    names = {
        'block1': ('entry_flow', '0'),
        'block2': ('entry_flow', '1'),
        'block3': ('entry_flow', '2'),
        'block11': ('middle_flow', '7'),
        'block12': ('exit_flow', '0'),
    }
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v,
            jnp.zeros((1, 299, 299, 3)),
            capture_intermediates=lambda m, _: m.path in names.values(),
            mutable=['intermediates'],
        ),
        v,
    )
    got = {
        n: state['intermediates'][flow][b]['__call__'][0].shape[1:]
        for n, (flow, b) in names.items()
    }
    assert got == {
        'block1': (74, 74, 128),
        'block2': (37, 37, 256),
        'block3': (19, 19, 728),
        'block11': (19, 19, 728),
        'block12': (10, 10, 1024),
    }
    fmap = jax.eval_shape(
        lambda v: jaxcnn.forward_features(model, v, jnp.zeros((1, 299, 299, 3))), v
    )
    assert fmap.shape == (1, 10, 10, 2048)


def test_too_small_input_is_refused_clearly():
    model = jaxcnn.create_model('xception')
    assert jaxcnn.model_info('xception').min_input == 7
    with pytest.raises(ValueError, match='needs inputs of at least 7x7, got 6x6'):
        abstract_variables(model, (1, 6, 6, 3))
    assert jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 7, 7, 3))))


def test_drop_path_drops_the_separable_branch():
    model = jaxcnn.create_model(
        'xception', num_classes=4, width=0.125, middle_repeats=1, drop_path_rate=0.5
    )
    v = random_variables(model, (4, 32, 32, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3), jnp.float32)
    run = jit_once(
        lambda v, k: model.apply(
            v, x, train=True, rngs={'dropout': jax.random.key(k)}, mutable=['batch_stats']
        )[0]
    )
    assert not np.allclose(run(v, 0), run(v, 1))
    plain = jaxcnn.create_model('xception', num_classes=4, width=0.125, middle_repeats=1)
    run0 = jit_once(
        lambda v, k: plain.apply(
            v, x, train=True, rngs={'dropout': jax.random.key(k)}, mutable=['batch_stats']
        )[0]
    )
    np.testing.assert_array_equal(run0(v, 0), run0(v, 1))
