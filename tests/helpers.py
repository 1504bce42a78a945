"""Small utilities shared by the tests."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn


def jit_once(fun, **kwargs):
    """`jax.jit` for a function a test runs once or a few times. LLVM -O0 compiles model-sized
    programs 30-40 % faster than the suite's -O1 with the same results; the slower code
    costs nothing on a test's few small batches."""
    return jax.jit(fun, compiler_options={'xla_backend_optimization_level': 0}, **kwargs)


def abstract_variables(model, input_shape):
    """Shapes of a model's variables without running (or compiling) its initialiser."""
    x = jnp.zeros(input_shape, jnp.float32)
    return jax.eval_shape(
        lambda: model.init(
            {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, train=False
        )
    )


def random_variables(model, input_shape, seed=0):
    """Variables filled like an initialiser would (fan-in scaled kernels, unit scales),
    built on the host so tests need not compile each model's init."""
    # PCG64's float32 normals: several times faster than RandomState.randn for the largest
    # models (hundreds of millions of parameters)
    rng = np.random.default_rng(seed)
    shapes = abstract_variables(model, input_shape)

    def fill(path, s):
        leaf = path[-1].key
        if leaf in ('scale', 'var'):
            return jnp.ones(s.shape, s.dtype)
        if leaf in ('bias', 'mean'):
            return jnp.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
        values = rng.standard_normal(s.shape, dtype=np.float32)
        values *= np.float32(1 / np.sqrt(max(fan_in, 1)))
        return jnp.asarray(values, s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def smallest_per(names, group_key):
    """The model with the fewest parameters in each group of `names` under `group_key`."""
    groups = {}
    for name in names:
        groups.setdefault(group_key(name), []).append(name)
    return sorted(
        min(g, key=lambda n: jaxcnn.model_info(n).reference_params) for g in groups.values()
    )


def kind(name):
    """A model's family, class and kind of block (the string and boolean fields of its
    configuration: block type, activation, norm, padding...). Members of one kind differ only in
    numbers (depth, width, groups, ratios), which no differentiation rule or dtype path depends on."""
    model = jaxcnn.create_model(name)
    fields = tuple(
        (f.name, getattr(model, f.name))
        for f in dataclasses.fields(model)
        if f.name not in ('parent', 'name') and isinstance(getattr(model, f.name), (str, bool))
    )
    return jaxcnn.model_info(name).family, type(model), fields


def one_per_kind(names):
    """One model per kind (see `kind`), the one with the fewest parameters."""
    return smallest_per(names, kind)


# Depth-only reductions for the tests that run every model (jit, feature pyramids). PyramidNet's units all differ in width, so XLA:CPU
# compiles 36-90 of them unrolled (2-6 minutes each, and the memory of two such compiles at
# once); the same unit code (alpha, bottleneck, downsampling) runs here at depth 20 / 29 and
# the registered depths are covered by the exact hand-count test.
# DenseNet-121/161/169/201: each dense layer has its own input width, so none can be scanned and
# XLA:CPU takes 50-120 s per compile; the jit pass runs their layer code (growth rate, width,
# bottleneck, compression) with two layers per block; full depth is covered by the exact counts
# and the converted-logits tests against torchvision.
_DENSENET_SHALLOW = {'densenet121', 'densenet161', 'densenet169', 'densenet201'}
_PYRAMID_SHALLOW = {'pyramidnet110_a48': 20, 'pyramidnet272_a200_bottleneck': 29}
# NFNet-F2..F6 are F0 with every stage (f + 1) times deeper (tests/test_nfnet.py); their stages
# are scanned, so compiles barely grow, but creating and differentiating 190-440M parameters on
# the host took 55-86 s a test; they run at F1's depths (every stage scanned, as at full depth).
_NFNET_SHALLOW = {f'nfnet_f{f}' for f in range(2, 7)}
# ConvNeXt-L/XL: 198M and 350M parameters, most in the 27 blocks of stage 3 and the 3 of stage 4.
# Checking every mode of differentiation holds about twelve copies of the parameters at once
# (directions, gradients, the Hessian-vector product, finite-difference points): 17 GB at XL.
# They run with two blocks a stage (their stages are scanned, so the block code is the same).
_CONVNEXT_SHALLOW = {'convnext_large', 'convnext_xlarge'}


def shallow_overrides(name):
    """Depth-only overrides that keep a model's block code but make it quick to trace."""
    if name in _PYRAMID_SHALLOW:
        return {'depth': _PYRAMID_SHALLOW[name]}
    if name in _DENSENET_SHALLOW:
        return {'depths': (2, 2, 2, 2)}
    if name in _NFNET_SHALLOW:
        return {'depths': (2, 4, 12, 6)}
    if name in _CONVNEXT_SHALLOW:
        return {'depths': (2, 2, 2, 2)}
    return {}


def randomise_batchnorm(model, seed=0):
    """A PyTorch reference with non-trivial BatchNorm gains, biases and running statistics, in
    eval mode: default init makes BatchNorm an identity, which a wrong conversion of them
    would pass."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    return model.eval()


def test_input_size(name):
    """Smallest convenient square input for a model (its own size for CIFAR models)."""
    info = jaxcnn.model_info(name)
    return max(32, info.min_input) if info.input_size[0] > 64 else info.input_size[0]


def tfds_or_skip():
    """tensorflow_datasets, imported the way jaxcnn imports it (Triton first, where installed:
    after TensorFlow it crashes the process), or a skip naming the install line."""
    from jaxcnn.data.tfds_input import import_tfds

    try:
        return import_tfds()[1]
    except ImportError as e:
        pytest.skip(str(e))
