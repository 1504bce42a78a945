"""MobileNet v1 against Table 1 (layer widths and strides) and Table 6 (width multipliers)."""

import jax
import jax.numpy as jnp
import pytest

import jaxcnn
from helpers import abstract_variables

# Table 1: (stride of the depthwise conv, output channels of the pointwise conv) per layer pair.
TABLE1 = (
    [(1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512)]
    + [(1, 512)] * 5
    + [(2, 1024), (1, 1024)]
)


def test_layers_follow_table1():
    model = jaxcnn.create_model('mobilenetv1_100')
    v = abstract_variables(model, (1, 224, 224, 3))
    p = v['params']
    blocks = [(s, b) for s, n in enumerate((1, 2, 2, 6, 2)) for b in range(n)]
    assert len(blocks) == len(TABLE1) == 13
    _, state = jax.eval_shape(
        lambda v: model.apply(
            v, jnp.zeros((1, 224, 224, 3)), capture_intermediates=True, mutable=['intermediates']
        ),
        v,
    )
    size, cin = 112, 32
    for (s, b), (stride, c) in zip(blocks, TABLE1):
        blk = p[f'blocks_{s}_{b}']
        assert blk['conv_dw']['kernel'].shape == (3, 3, 1, cin)  # depthwise: one 3x3 per channel
        assert blk['conv_pw']['kernel'].shape == (1, 1, cin, c)
        size //= stride
        assert state['intermediates'][f'blocks_{s}_{b}']['__call__'][0].shape == (1, size, size, c)
        cin = c
    assert size == 7


@pytest.mark.parametrize(
    'name,stem,last',
    [('mobilenetv1_025', 8, 256), ('mobilenetv1_050', 16, 512), ('mobilenetv1_075', 24, 768)],
)
def test_width_multiplier_thins_every_layer(name, stem, last):
    p = abstract_variables(jaxcnn.create_model(name), (1, 64, 64, 3))['params']
    assert p['conv_stem']['kernel'].shape[-1] == stem
    assert p['head']['fc']['kernel'].shape == (last, 1000)


def test_bad_input():
    model = jaxcnn.create_model('mobilenetv1_100')
    v = abstract_variables(model, (1, 32, 32, 3))
    with pytest.raises(ValueError, match='NHWC image batch'):
        model.apply(v, jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match='at least 32x32'):
        model.apply(v, jnp.zeros((1, 16, 16, 3)))
