"""The oneDNN convolutions (kernels/onednn.py): built here, equal to XLA's convolution in value and
in derivatives of every order and mode, and taken by the CPU policy where they apply. (Against
PyTorch's autograd over many geometries: test_kernels.test_conv_forms_match_pytorch_autograd.)"""

import functools
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import kernels
from jaxcnn.kernels import onednn

RNG = np.random.RandomState(0)
DN = ('NHWC', 'HWIO', 'NHWC')
# (input shape, kernel shape, strides, dilation, pads): ResNet's stem and a strided 3x3, a
# dilated kernel, one-sided and uneven padding with rows the last window never reaches, a
# strided 1x1 shortcut, a non-square map
GEOMETRIES = [
    ((2, 16, 16, 3), (7, 7, 3, 8), (2, 2), (1, 1), ((3, 3), (3, 3))),
    ((2, 9, 9, 5), (3, 3, 5, 6), (2, 2), (1, 1), ((1, 1), (1, 1))),
    ((1, 11, 11, 4), (3, 3, 4, 4), (1, 1), (2, 2), ((2, 2), (2, 2))),
    ((2, 10, 10, 4), (3, 3, 4, 6), (2, 2), (1, 1), ((0, 2), (1, 0))),
    ((3, 8, 8, 6), (1, 1, 6, 12), (2, 2), (1, 1), ((0, 0), (0, 0))),
    ((2, 6, 13, 4), (3, 5, 4, 3), (1, 3), (1, 1), ((1, 0), (2, 2))),
]


def _lax(x, k, strides, dilation, pads):
    return jax.lax.conv_general_dilated(
        x, k, strides, pads, rhs_dilation=dilation, dimension_numbers=DN
    )


def _close(got, want, rtol=1e-4):
    """Equal up to float32 rounding, measured against the array's scale (sums of hundreds of
    products round differently in each library's order)."""
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(want))))


def _operands(x_shape, k_shape):
    return (
        jnp.asarray(RNG.randn(*x_shape), jnp.float32),
        jnp.asarray(RNG.randn(*k_shape) * 0.3, jnp.float32),
    )


def test_the_handlers_build_on_this_machine():
    """CI's machine (x86-64 Linux, a C++ compiler, the oneDNN wheels from the package's
    dependencies) must build them; a silent fallback would leave the CPU on Eigen's kernels."""
    if sys.platform != 'linux' or platform.machine() != 'x86_64':
        assert not onednn.available() and 'x86-64 Linux' in onednn.unavailable_reason()
        return
    assert onednn.available(), onednn.unavailable_reason()
    assert onednn.unavailable_reason() is None


def test_a_damaged_file_in_the_cache_is_built_anew(tmp_path):
    """A truncated copy of the compiled handlers where the cache keeps them (an interrupted sync,
    a full disk) is rebuilt on first use rather than leaving the CPU on XLA's kernels."""
    if sys.platform != 'linux' or platform.machine() != 'x86_64':
        pytest.skip('the oneDNN wheels are for x86-64 Linux')
    damaged = tmp_path / onednn._build().name
    damaged.write_bytes(b'\x7fELF truncated')
    probe = (
        'from jaxcnn.kernels import onednn; print(onednn.available(), onednn.unavailable_reason())'
    )
    done = subprocess.run(
        [sys.executable, '-c', probe],
        capture_output=True,
        text=True,
        env={**os.environ, 'JAXCNN_CACHE_DIR': str(tmp_path)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ['True', 'None'], done.stdout
    assert damaged.stat().st_size > 10_000 and damaged.read_bytes()[:4] == b'\x7fELF'


@pytest.mark.parametrize('x_shape,k_shape,strides,dilation,pads', GEOMETRIES)
def test_convolution_and_gradients_equal_lax(x_shape, k_shape, strides, dilation, pads):
    x, k = _operands(x_shape, k_shape)
    args = (strides, dilation, pads)
    y = jax.jit(onednn.conv, static_argnums=(2, 3, 4))(x, k, *args)
    want, vjp = jax.vjp(lambda x, k: _lax(x, k, *args), x, k)
    assert y.shape == want.shape == onednn.output_shape(x_shape, k_shape, *args)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    dy = jnp.asarray(RNG.randn(*want.shape), jnp.float32)
    got = jax.jit(lambda x, k, dy: jax.vjp(lambda x, k: onednn.conv(x, k, *args), x, k)[1](dy))(
        x, k, dy
    )
    for g, e in zip(got, vjp(dy)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('x_shape,k_shape,strides,dilation,pads', GEOMETRIES[1:4])
def test_second_and_third_derivatives_equal_lax(x_shape, k_shape, strides, dilation, pads):
    """The gradients are the same handlers, each differentiable in every mode, so reverse mode
    nests: the gradient of a loss on the input gradient (a gradient penalty), one order further,
    and forward mode over both (jvp, Hessian-vector products), equal lax's."""
    x, k = _operands(x_shape, k_shape)
    args = (strides, dilation, pads)

    def penalty(conv, x, k):  # |d loss / d x|^2 for loss = sum(sin(conv(x, k)))
        dx = jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, k, *args))))(x)
        return jnp.sum(dx**2)

    def third(conv, x, k):  # a scalar of the penalty's kernel gradient, differentiated
        return jnp.sum(jnp.cos(jax.grad(penalty, 2)(conv, x, k)))

    for f in (penalty, third):
        got = jax.jit(jax.grad(functools.partial(f, onednn.conv), (0, 1)))(x, k)
        want = jax.grad(functools.partial(f, _lax), (0, 1))(x, k)
        for g, e in zip(got, want):
            _close(g, e)
    tangents = (jnp.ones_like(x), jnp.ones_like(k))
    for transform in (
        lambda f: jax.jvp(f, (x, k), tangents),
        lambda f: jax.jvp(jax.grad(f, (0, 1)), (x, k), tangents),
        lambda f: jax.linearize(f, x, k)[1](*tangents),
    ):
        got = jax.jit(lambda: transform(functools.partial(penalty, onednn.conv)))()
        want = transform(functools.partial(penalty, _lax))
        for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            _close(g, e)


def test_inside_scan_and_vmap():
    """A scanned stack (the forms' loop bodies) and a vmapped batch of inputs give lax's numbers."""
    x = jnp.asarray(RNG.randn(2, 8, 8, 4), jnp.float32)
    ks = jnp.asarray(RNG.randn(3, 3, 3, 4, 4) * 0.3, jnp.float32)
    args = ((1, 1), (1, 1), ((1, 1), (1, 1)))

    def stack(conv, ks, x):
        x, _ = jax.lax.scan(lambda h, k: (jnp.tanh(conv(h, k, *args)), None), x, ks)
        return jnp.sum(x**2)

    got = jax.jit(jax.grad(functools.partial(stack, onednn.conv), (0, 1)))(ks, x)
    want = jax.grad(functools.partial(stack, _lax), (0, 1))(ks, x)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    xs = jnp.asarray(RNG.randn(3, 2, 8, 8, 4), jnp.float32)
    np.testing.assert_allclose(
        jax.vmap(lambda x: onednn.conv(x, ks[0], *args))(xs),
        jax.vmap(lambda x: _lax(x, ks[0], *args))(xs),
        rtol=1e-4,
        atol=1e-4,
    )


def test_cpu_policy_takes_onednn_for_dense_float32_convolutions_only():
    """Under the CPU policy a dense float32 convolution is a oneDNN call; grouped, depthwise,
    bfloat16 and negatively padded ones, and any with the policy's onednn off, are not."""
    x32, k32 = _operands((2, 8, 8, 4), (3, 3, 4, 4))

    def calls(x, k, groups=1, pads=((1, 1), (1, 1))):
        with kernels.use(kernels.CPU):
            return str(
                jax.make_jaxpr(
                    lambda x, k: kernels.conv_general_dilated(
                        x, k, (1, 1), pads, dimension_numbers=DN, feature_group_count=groups
                    )
                )(x, k)
            ).count('rule=onednn.conv]')

    assert calls(x32, k32) == 1
    assert calls(x32, k32[:, :, :2], groups=2) == 0
    assert calls(x32, k32[:, :, :1], groups=4) == 0
    assert calls(x32.astype(jnp.bfloat16), k32.astype(jnp.bfloat16)) == 0
    assert calls(x32, k32, pads=((-1, 1), (1, 1))) == 0
    with kernels.use(onednn=False):
        jaxpr = str(
            jax.make_jaxpr(
                lambda x, k: kernels.conv_general_dilated(
                    x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN
                )
            )(x32, k32)
        )
    assert 'onednn' not in jaxpr and 'conv_general_dilated' in jaxpr
