"""Every registered model through the same checks: parameter count against its reference, a
jitted forward/backward pass in train and inference mode (fp32; bf16 for one model of each kind),
and bf16 compute reaching every convolution and product (traced)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn.layers.conv import _sub_jaxprs
from jaxcnn.optim import classification_loss, split_outputs
from helpers import abstract_variables, random_variables, test_input_size as input_size, jit_once

ALL = jaxcnn.list_models()


@pytest.mark.parametrize('name', ALL)
def test_param_count_matches_reference(name):
    info = jaxcnn.model_info(name)
    assert info.reference and info.reference_params, f'{name} has no reference'
    h, w, c = info.input_size
    model = jaxcnn.create_model(name)
    n = jaxcnn.count_params(abstract_variables(model, (1, h, w, c))['params'])
    if info.params_rounding is None:
        assert n == info.reference_params, (n, info.reference_params)
    else:
        # a paper's rounded figure: the count must round to it
        assert abs(n - info.reference_params) <= info.params_rounding / 2, (n, info.reference_params)


# Depth-only reductions for the jit test. PyramidNet's units all differ in width, so XLA:CPU
# compiles 36-90 of them unrolled (2-6 minutes each, and the memory of two such compiles at
# once); the same unit code (alpha, bottleneck, downsampling) runs here at depth 20 / 29 and
# the registered depths are covered by the exact hand-count test.
# DenseNet-161/169/201: each dense layer has its own input width, so none can be scanned and
# XLA:CPU takes 70-120 s per compile; the jit pass runs their layer code (growth rate, width,
# bottleneck, compression) with two layers per block; full depth is covered by the exact counts
# and the converted-logits tests against torchvision.
_DENSENET_SHALLOW = {'densenet161', 'densenet169', 'densenet201'}
_PYRAMID_SHALLOW = {'pyramidnet110_a48': 20, 'pyramidnet272_a200_bottleneck': 29}
# NFNet-F2..F6 are F0 with every stage (f + 1) times deeper (tests/test_nfnet.py); their stages
# are scanned, so compiles barely grow, but creating and differentiating 190-440M parameters on
# the host took 55-86 s a test; they run at F1's depths (every stage scanned, as at full depth).
_NFNET_SHALLOW = {f'nfnet_f{f}' for f in range(2, 7)}


def jit_test_overrides(name):
    if name in _PYRAMID_SHALLOW:
        return {'depth': _PYRAMID_SHALLOW[name]}
    if name in _DENSENET_SHALLOW:
        return {'depths': (2, 2, 2, 2)}
    if name in _NFNET_SHALLOW:
        return {'depths': (2, 4, 12, 6)}
    return {}


def test_jit_overrides_only_reduce_depth():
    # the reduced models keep every other hyper-parameter of the registered one
    for name in ALL:
        over = jit_test_overrides(name)
        full, reduced = jaxcnn.create_model(name), jaxcnn.create_model(name, **over)
        assert set(over) <= {'depth', 'depths'}
        for field in type(full).__dataclass_fields__:
            if field not in over and field not in ('parent', 'name'):
                assert getattr(full, field) == getattr(reduced, field), (name, field)


# Segmentation models give per-pixel logits; tests/test_unet.py trains and checks them.
CLASSIFIERS = [n for n in ALL if jaxcnn.model_info(n).family != 'unet']


def _bf16_compiled_models():
    """The models whose jit pass also runs in bfloat16: one per family, model class and kind of
    block (the string and boolean fields of its configuration: block type, activation, norm,
    padding...), the one with the fewest parameters. Its other members differ only in numbers
    (depth, width, groups, ratios); their bfloat16 layers are checked by tracing, without a
    compile, in test_bf16_reaches_every_convolution_and_product. A bfloat16 compile of XLA:CPU
    takes about twice an fp32 one, and compiles are most of this suite's time."""
    groups = {}
    for name in CLASSIFIERS:
        model = jaxcnn.create_model(name)
        kinds = tuple((f.name, getattr(model, f.name)) for f in dataclasses.fields(model)
                      if f.name not in ('parent', 'name') and isinstance(getattr(model, f.name), (str, bool)))
        groups.setdefault((jaxcnn.model_info(name).family, type(model), kinds), []).append(name)
    return sorted(min(g, key=lambda n: jaxcnn.model_info(n).reference_params) for g in groups.values())


BF16_COMPILED = _bf16_compiled_models()


@pytest.mark.parametrize('name,dtype', [(n, 'float32') for n in CLASSIFIERS] +
                         [(n, 'bfloat16') for n in BF16_COMPILED])
def test_jit_forward_backward(name, dtype):
    dtype = jnp.dtype(dtype)
    size = input_size(name)
    model = jaxcnn.create_model(name, num_classes=7, dtype=dtype, drop_rate=0.1, drop_path_rate=0.1,
                                **jit_test_overrides(name))
    variables = random_variables(model, (2, size, size, 3))
    x = jnp.asarray(np.random.RandomState(1).randn(2, size, size, 3), jnp.float32)
    labels = jnp.array([1, 5])

    @jit_once
    def step(variables, x):
        def loss_fn(params):
            outputs, state = model.apply({**variables, 'params': params}, x, train=True,
                                         rngs={'dropout': jax.random.key(0)}, mutable=['batch_stats'])
            # the trainer's loss: auxiliary heads (GoogLeNet, Inception-v3) add with weight 0.3
            loss = classification_loss(outputs, labels, 7)
            return loss, (split_outputs(outputs)[0], state)
        grads, (train_logits, state) = jax.grad(loss_fn, has_aux=True)(variables['params'])
        eval_logits = model.apply(variables, x, train=False)
        return grads, train_logits, state, eval_logits

    grads, train_logits, state, eval_logits = step(variables, x)
    assert train_logits.shape == eval_logits.shape == (2, 7)
    assert eval_logits.dtype == dtype
    assert np.isfinite(np.asarray(eval_logits, np.float32)).all()
    # parameters stay fp32 whatever the compute dtype, and gradients reach every one of them
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(variables['params'])):
        assert g.dtype == p.dtype == jnp.float32
        assert np.isfinite(np.asarray(g)).all()
    head_grad = grads['head']['fc']['kernel']
    assert np.abs(np.asarray(head_grad)).sum() > 0
    stem_grad = jax.tree.leaves(grads)[0]
    assert np.abs(np.asarray(stem_grad)).sum() > 0
    if 'batch_stats' in variables:
        # train mode moves the running statistics; inference mode does not use batch statistics
        before = jax.tree.leaves(variables['batch_stats'])[0]
        after = jax.tree.leaves(state['batch_stats'])[0]
        assert not np.allclose(before, after)


# Products that stay float32 in a bfloat16 model by design, as (file, qualified function): the adaptive
# average pool's bin matrices (PyTorch's bins exactly, at HIGHEST precision) and HyperNetworks'
# kernel generator (a kernel made in the parameter dtype, then cast for its convolution).
_FLOAT32_BY_DESIGN = {('layers/conv.py', 'adaptive_avg_pool'), ('layers/dynamic.py', 'HyperConv.generate')}


def _convolutions_and_products(jaxpr):
    """Every convolution, matrix product and foreign call of a jaxpr, nested bodies included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ('conv_general_dilated', 'dot_general', 'ffi_call'):
            yield eqn
        for sub in _sub_jaxprs(eqn.params.values()):
            yield from _convolutions_and_products(sub)


@pytest.mark.parametrize('name', CLASSIFIERS)
def test_bf16_reaches_every_convolution_and_product(name):
    """A bfloat16 model computes every layer in bfloat16: the forward passes (train and
    inference) traced, not compiled, take no float32 operand into a convolution or product."""
    size = input_size(name)
    model = jaxcnn.create_model(name, num_classes=7, dtype=jnp.bfloat16, drop_rate=0.1,
                                drop_path_rate=0.1, **jit_test_overrides(name))
    variables = abstract_variables(model, (2, size, size, 3))
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    rngs = {'dropout': jax.random.key(0)}
    for train in (True, False):
        jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=train, rngs=rngs,
                                                        mutable=['batch_stats']))(variables, x)
        ops = list(_convolutions_and_products(jaxpr.jaxpr))
        assert ops
        float32 = [e for e in ops if any(v.aval.dtype == jnp.float32 for v in e.invars)
                   and not any((f.file_name.endswith(path) and f.function_name == fn)
                               for f in e.source_info.traceback.frames
                               for path, fn in _FLOAT32_BY_DESIGN)]
        assert not float32, (name, train, [(e.primitive.name, [str(v.aval) for v in e.invars])
                                           for e in float32[:3]])


def pyramidnet_closed_form(depth, alpha, bottleneck, num_classes=10):
    """Parameters of a PyramidNet counted by hand from the paper's unit definitions."""
    n = 3 * ((depth - 2) // (9 if bottleneck else 6))
    bn = lambda c: 2 * c
    total = 3 * 3 * 3 * 16 + bn(16)
    c_in = 16
    for k in range(1, n + 1):
        d = (16 * n + alpha * k) // n       # eq. 2's floor, in integers
        if bottleneck:
            c_out = 4 * d
            total += bn(c_in) + c_in * d + bn(d) + 9 * d * d + bn(d) + d * c_out + bn(c_out)
        else:
            c_out = d
            total += bn(c_in) + 9 * c_in * d + bn(d) + 9 * d * d + bn(d)
        c_in = c_out
    return total + bn(c_in) + c_in * num_classes + num_classes


@pytest.mark.parametrize('name,overrides', [(n, {}) for n in jaxcnn.list_models('pyramidnet*')] + [
    # Table 4's alpha-270 rows, built by override (not registered: 0.7-0.8 % above the table)
    ('pyramidnet110_a48', {'alpha': 270}),
    ('pyramidnet272_a200_bottleneck', {'alpha': 270, 'depth': 164})])
def test_pyramidnet_count_equals_hand_count(name, overrides):
    model = jaxcnn.create_model(name, **overrides)
    n = jaxcnn.count_params(abstract_variables(model, (1, 32, 32, 3))['params'])
    assert n == pyramidnet_closed_form(model.depth, model.alpha, model.bottleneck)
    if overrides:
        # the figures the module docstring quotes against the paper's 28.3M and 27.0M
        assert n == {110: 28_485_477, 164: 27_216_021}[model.depth]


def test_cifar_resnet_count_equals_hand_count():
    """ResNet-6n+2 with option A: 3x3 convs 16/32/64 wide, BN after each, no shortcut weights."""
    for depth in (20, 56, 110):
        n = (depth - 2) // 6
        convs = 9 * 3 * 16 + sum(9 * (c_in * c + c * c) + 9 * (n - 1) * 2 * c * c
                                 for c_in, c in [(16, 16), (16, 32), (32, 64)])
        bns = 2 * 16 + 2 * 2 * n * (16 + 32 + 64)
        model = jaxcnn.create_model(f'resnet{depth}')
        got = jaxcnn.count_params(abstract_variables(model, (1, 32, 32, 3))['params'])
        assert got == convs + bns + 64 * 10 + 10


def test_shortcut_options_a_b_c():
    """B projects only where the shape changes, C on every block, A never (zero-padding)."""
    count = lambda **kw: jaxcnn.count_params(
        abstract_variables(jaxcnn.create_model('resnet18', **kw), (1, 64, 64, 3))['params'])
    b = count(shortcut='B')
    assert b == 11_689_512
    # blocks that keep their shape: two in layer1 (64 ch), the second of layers 2-4
    identity_blocks = [64, 64, 128, 256, 512]
    assert count(shortcut='C') == b + sum(c * c + 2 * c for c in identity_blocks)
    projections = [(64, 128), (128, 256), (256, 512)]
    assert count(shortcut='A') == b - sum(ci * co + 2 * co for ci, co in projections)


@pytest.mark.parametrize('name,overrides', [('resnet20', {}), ('resnetv2_50', {}),
                                            ('wrn_16_8', {'block_dropout': 0.0}),
                                            ('pyramidnet110_a48', {'depth': 20})])
def test_stochastic_depth_on_every_residual_family(name, overrides):
    size = input_size(name)
    x = jnp.asarray(np.random.RandomState(0).randn(4, size, size, 3), jnp.float32)

    def outputs(rate):
        model = jaxcnn.create_model(name, drop_path_rate=rate, **overrides)
        v = random_variables(model, x.shape)
        run = lambda k: model.apply(v, x, train=True, rngs={'dropout': jax.random.key(k)},
                                    mutable=['batch_stats'])[0]
        return run(0), run(1)
    a, b = outputs(0.0)
    np.testing.assert_allclose(a, b, rtol=1e-6)        # nothing random without drop-path
    a, b = outputs(0.5)
    assert not np.allclose(a, b)                        # blocks are dropped per sample
