"""Static hypernetwork (Ha, Dai & Le 2016 §3.1): free-parameter hand counts against Table 2,
generated kernels against the Wide ResNet's conv shapes and against eq. 2-3 in NumPy, and
gradients reaching the embeddings and the shared generator."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxcnn
from jaxcnn.layers.dynamic import HyperConv, HyperKernelGenerator
from jaxcnn.models.resnet import ResNet
from helpers import abstract_variables, random_variables, jit_once

N_Z = D = 64  # embedding size and generator hidden size (the paper's N_z = d = 64)
F_SIZE = 3


def wrn_convs(k, n=6):
    """(C_in, C_out) of the generated 3x3 convs of WRN-(6n+4)-k, stem excluded (36 at n=6)."""
    convs, c = [], 16
    for w in (16 * k, 32 * k, 64 * k):
        for b in range(n):
            convs += [(c if b == 0 else w, w), (w, w)]
        c = w
    return convs


def hand_count(k, generated=True):
    """Free parameters of the Hyper WRN 40-k (or, generated=False, of the same net with
    ordinary kernels), layout of jaxcnn.models.hypernet: pre-activation blocks, option-A
    shortcuts, biased convs."""
    convs = wrn_convs(k)
    if generated:
        embeddings = N_Z * sum((ci // 16) * (co // 16) for ci, co in convs)
        # §3.1: N_z x D + d (N_z + 1) N_in + f_size x N_out x f_size x (d + 1)
        generator = D * (N_Z + 1) * 16 + F_SIZE * 16 * F_SIZE * (D + 1)
        kernels = embeddings + generator
    else:
        kernels = sum(9 * ci * co for ci, co in convs)
    conv_biases = sum(co for _, co in convs)
    stem = 9 * 3 * 16 + 16
    bns = sum(2 * ci + 2 * co for ci, co in convs[::2]) + 2 * 64 * k  # bn1, bn2 per block; final
    head = 64 * k * 10 + 10
    return kernels + conv_biases + stem + bns + head


def count(name, **kw):
    return jaxcnn.count_params(
        abstract_variables(jaxcnn.create_model(name, **kw), (1, 32, 32, 3))['params']
    )


@pytest.mark.parametrize('k,table', [(1, 0.097e6), (2, 0.148e6)])
def test_hyper_wrn_free_parameters_by_hand(k, table):
    assert len(wrn_convs(k)) == 36  # "36 layers of kernels in total"
    n = hand_count(k)
    assert count(f'hyper_wrn40_{k}') == n
    assert round(n / 1e3) * 1e3 == table  # Table 2, to its 0.001M
    info = jaxcnn.model_info(f'hyper_wrn40_{k}')
    assert info.reference_params == table and info.params_rounding == 1e3


def test_generator_count_is_the_papers_formula():
    shapes = jax.eval_shape(lambda: HyperKernelGenerator().init(jax.random.key(0), jnp.zeros(N_Z)))
    assert jaxcnn.count_params(shapes) == 75_920 == D * (N_Z + 1) * 16 + 9 * 16 * (D + 1)
    # and embeddings: 966 for WRN 40-2 (e.g. a 32 x 64 kernel takes 2 x 4 of them, eq. 3)
    assert sum((ci // 16) * (co // 16) for ci, co in wrn_convs(2)) == 966


def test_table2_plain_counts_support_the_layout():
    # the same layout with ordinary kernels gives the paper's own WRN figures (0.563M, 2.236M
    # to within 2 parameters of the rounding edge), while projection shortcuts would add
    # 16*32 + 32*64 + 64*128 = 10,752 and give 2.246M
    assert round(hand_count(1, generated=False) / 1e3) == 563
    assert abs(hand_count(2, generated=False) - 2.236e6) <= 502


def blocks_of(params):
    """{'<stage>/<b>': block params} for every block of every stage (``layer{s}/{b}``)."""
    return {
        f'{stage}/{b}': block
        for stage, blocks in params.items()
        if stage.startswith('layer')
        for b, block in blocks.items()
    }


def generated_kernels(params):
    """{block path: kernel} for every HyperConv, from the embeddings and the generator."""
    gen = HyperKernelGenerator().bind({'params': params['generator']})
    out = {}
    for name, block in blocks_of(params).items():
        for conv in ('conv1', 'conv2'):
            if isinstance(block, dict) and conv in block:
                c_in = block[conv]['z'].shape[0] * 16
                out[f'{name}/{conv}'] = HyperConv.generate(block[conv]['z'], gen) * np.sqrt(
                    16 / c_in
                )
    return out


def test_generated_kernels_have_the_wide_resnets_conv_shapes():
    model = jaxcnn.create_model('hyper_wrn40_2')
    params = random_variables(model, (1, 32, 32, 3))['params']
    kernels = generated_kernels(params)
    wrn = ResNet(
        layers=(6, 6, 6),
        widths=(32, 64, 128),
        block='preact_basic',
        stem='cifar',
        stem_width=16,
        num_classes=10,
    )
    wrn_params = abstract_variables(wrn, (1, 32, 32, 3))['params']
    assert len(kernels) == 36
    for path, kernel in kernels.items():
        stage, b, conv = path.split('/')
        assert kernel.shape == wrn_params[stage][b][conv]['kernel'].shape, path


def numpy_g(z, p):
    """Eq. 2 literally: a_i = W_i z + B_i; K_i = <W_out, a_i> + B_out; K = (K_1 ... K_Nin)."""
    w_in, b_in = (
        np.asarray(p['fc1']['kernel'], np.float64),
        np.asarray(p['fc1']['bias'], np.float64),
    )
    w_out, b_out = (
        np.asarray(p['fc2']['kernel'], np.float64),
        np.asarray(p['fc2']['bias'], np.float64),
    )
    kernel = np.zeros((3, 3, 16, 16))
    for i in range(16):
        a_i = w_in[:, i, :].T @ z + b_in[i]  # W_i (d x N_z) z + B_i
        kernel[:, :, i, :] = np.tensordot(a_i, w_out, axes=(0, 0)) + b_out
    return kernel


def test_tiled_kernel_blocks_are_g_of_their_own_embedding():
    gen = HyperKernelGenerator()
    p = gen.init(jax.random.key(0), jnp.zeros(N_Z))['params']
    p = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), p)
    z = np.random.RandomState(0).randn(2, 4, N_Z)  # a 32 -> 64 kernel: 2 x 4 basic blocks
    kernel = np.asarray(HyperConv.generate(jnp.asarray(z, jnp.float32), gen.bind({'params': p})))
    assert kernel.shape == (3, 3, 32, 64)
    for r in range(2):
        for c in range(4):
            block = kernel[:, :, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)]
            np.testing.assert_allclose(block, numpy_g(z[r, c], p), rtol=1e-4, atol=1e-4)


class OneHyperConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        generator = HyperKernelGenerator(name='generator')
        return HyperConv(16, 3, stride=2, use_bias=True, name='conv')(x, generator)


def test_hyperconv_is_a_convolution_with_the_generated_kernel():
    x = np.random.RandomState(0).randn(2, 8, 8, 32).astype(np.float32)
    net = OneHyperConv()
    p = jax.tree.map(lambda a: a + 0.1, net.init(jax.random.key(0), jnp.asarray(x))['params'])
    got = net.apply({'params': p}, jnp.asarray(x))
    gen = HyperKernelGenerator().bind({'params': p['generator']})
    # 32 inputs = 2 row blocks: the fan-in constant is sqrt(16 / 32)
    kernel = np.asarray(HyperConv.generate(p['conv']['z'], gen)) * np.float32(np.sqrt(0.5))
    want = F.conv2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()),
        torch.from_numpy(np.array(p['conv']['bias'])),
        stride=2,
        padding=1,
    )
    np.testing.assert_allclose(
        np.asarray(got), want.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4
    )


def test_gradients_reach_every_embedding_and_the_generator():
    model = jaxcnn.create_model('hyper_wrn40_1')
    v = random_variables(model, (2, 32, 32, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)

    @jit_once
    def grads(params):
        def loss(params):
            logits, _ = model.apply({**v, 'params': params}, x, train=True, mutable=['batch_stats'])
            return jnp.sum(jax.nn.log_softmax(logits)[:, 3])

        return jax.grad(loss)(params)

    g = grads(v['params'])
    for name, leaf in jax.tree_util.tree_leaves_with_path(g['generator']):
        assert np.abs(np.asarray(leaf)).sum() > 0, name
    n_embeddings = 0
    for block, sub in blocks_of(g).items():
        for conv in ('conv1', 'conv2'):
            if isinstance(sub, dict) and conv in sub:
                zg = np.asarray(sub[conv]['z'])
                # every basic block's embedding receives a gradient
                assert (np.abs(zg).sum(axis=-1) > 0).all(), (block, conv)
                n_embeddings += 1
    assert n_embeddings == 36
