"""The stage helper (layers/stage.py): every model that can stack its stages has the same
weight-decay mask, AGC clipping and optimiser step stacked as unrolled, leaf by leaf and block by
block; stacked and unrolled stages compute the same function."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxcnn
from jaxcnn import config as config_lib
from jaxcnn import optim
from jaxcnn.layers.stage import STACKED, is_stacked, stack_like
from helpers import abstract_variables, random_variables, test_input_size as input_size


def _fields(name):
    return {f.name for f in dataclasses.fields(type(jaxcnn.create_model(name)))}


SCANNABLE = [n for n in jaxcnn.list_models() if 'scan_blocks' in _fields(n)]


def _stacked_and_unrolled(name):
    """(stacked model, unrolled model): scan_blocks on (the reversible default for reversible
    families) and off (with ordinary autodiff)."""
    off = {'scan_blocks': False, **({'reversible': False} if 'reversible' in _fields(name) else {})}
    return jaxcnn.create_model(name, scan_blocks=True), jaxcnn.create_model(name, **off)


def _params(model, name):
    size = input_size(name)
    return abstract_variables(model, (1, size, size, 3))['params']


def _small(shape, blocks=None):
    """A stand-in of the leaf's rank with every axis at most 3 long (and the stacked axis
    ``blocks`` long): masks, AGC's unit axes and the optimisers depend on a leaf's path and rank,
    not on its size, and small arrays keep the check cheap for 400M-parameter models."""
    dims = tuple(min(d, 3) for d in shape)
    return (blocks, *dims[1:]) if blocks is not None else dims


def _filled(shapes, seed):
    """Values for {key: shape}, with per-unit scales over decades so that AGC clips some units
    and not others."""
    rng = np.random.default_rng(seed)

    def fill(shape):
        scale = 10.0 ** rng.uniform(-3, 1, size=shape[-1:]) if shape else 1.0
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    return {k: fill(s) for k, s in shapes.items()}


def _stacked_leaves(flat):
    """The stacked leaves of a flattened parameter tree, each with the unrolled keys of its
    blocks in order."""
    out = {}
    for key, shape in flat.items():
        if not is_stacked(key):
            continue
        i = key.index(STACKED)
        prefix, rest = key[:i], key[i + 2 :]
        first = len({k[i] for k in flat if k[:i] == prefix and k[i].isdigit()})
        out[key] = [(*prefix, str(first + b), *rest) for b in range(shape.shape[0])]
    return out


def test_every_stacking_family_is_covered():
    families = {jaxcnn.model_info(n).family for n in SCANNABLE}
    assert {
        'resnet',
        'resnet_cifar',
        'convnext',
        'efficientnet',
        'nfnet',
        'multiresnet',
        'revnet',
        'irevnet',
    } <= families, families


@pytest.mark.parametrize('name', SCANNABLE)
def test_masks_agc_and_updates_equal_stacked_and_unrolled(name):
    """For each stacked leaf and each of its blocks: the weight-decay mask equals the unrolled
    block's; AGC (the NFNet recipe's lambda) clips it as the unrolled block; one AdamW step (the
    ConvNeXt recipe) and one AGC-SGD step (the NFNet-F0 recipe) move it as the unrolled block."""
    stacked_model, unrolled_model = _stacked_and_unrolled(name)
    flat_s = traverse_util.flatten_dict(_params(stacked_model, name))
    flat_u = traverse_util.flatten_dict(_params(unrolled_model, name))
    leaves = _stacked_leaves(flat_s)
    if not leaves:
        pytest.skip(f'{name} has no stage of stackable blocks')
    mask_s = traverse_util.flatten_dict(optim.decay_mask(traverse_util.unflatten_dict(flat_s)))
    mask_u = traverse_util.flatten_dict(optim.decay_mask(traverse_util.unflatten_dict(flat_u)))
    recipes = [config_lib.load_config(c)[0] for c in ('convnext_fmnist', 'nfnet_f0')]
    for key, blocks in leaves.items():
        assert all(b in flat_u for b in blocks), ('/'.join(key), blocks)
        assert all(mask_u[b] == mask_s[key] for b in blocks), ('/'.join(key), mask_s[key])
    # every stacked leaf and its first two blocks unrolled, as small stand-ins, in one tree each
    n = {key: min(len(blocks), 2) for key, blocks in leaves.items()}
    unrolled = {
        b: _small(flat_u[b].shape) for key, blocks in leaves.items() for b in blocks[: n[key]]
    }
    stacked_shapes = {key: _small(flat_s[key].shape, n[key]) for key in leaves}
    params_u, grads_u = (traverse_util.unflatten_dict(_filled(unrolled, seed)) for seed in (0, 1))
    # stacked by the rule in the stacked model's layout (which counts its unrolled blocks)
    restack = lambda tree: stack_like(tree, traverse_util.unflatten_dict(flat_s), complete=False)
    params_s, grads_s = restack(params_u), restack(grads_u)
    assert {k: v.shape for k, v in traverse_util.flatten_dict(params_s).items()} == stacked_shapes
    agc = optim.unitwise_agc(0.01)
    transforms = [('agc', lambda p: agc)] + [
        (r.optim.name, lambda p, r=r: optim.build_optimizer(r, p, 100, 1000, 128)[0])
        for r in recipes
    ]
    for label, make in transforms:
        got, want = (
            (lambda tx: tx.update(g, tx.init(p), p)[0])(make(p))
            for p, g in ((params_s, grads_s), (params_u, grads_u))
        )
        got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(restack(want))
        for key in leaves:
            np.testing.assert_allclose(
                got[key], want[key], rtol=1e-5, atol=1e-9, err_msg=f'{"/".join(key)} ({label})'
            )


def test_stacked_norm_scales_biases_and_gains_are_not_decayed():
    """The leaves the old suffix rule missed in ConvNeXt-T's and RevNet-38's stacked stages:
    biases, norm scales and layer-scale gammas carry no weight decay."""
    for name in ('convnext_tiny', 'revnet38'):
        mask = traverse_util.flatten_dict(
            optim.decay_mask(_params(jaxcnn.create_model(name), name)), sep='/'
        )
        stacked = {k: v for k, v in mask.items() if is_stacked(k)}
        assert stacked and any(stacked.values())
        decayed_vectors = [
            k
            for k, v in stacked.items()
            if v and k.rsplit('/', 1)[-1] in ('bias', 'scale', 'gamma')
        ]
        assert not decayed_vectors, (name, decayed_vectors)


@pytest.mark.parametrize(
    'name,overrides',
    [('resnet56', {}), ('revnet38', {}), ('convnext_tiny', {'depths': (2, 3, 2, 2)})],
)
def test_stacked_stages_compute_the_unrolled_function(name, overrides):
    """The same weights, unrolled and stacked (restacked by the stage helper's rule), give the
    same logits and, in training mode, the same gradients."""
    stacked, unrolled = (m.clone(**overrides) for m in _stacked_and_unrolled(name))
    size = input_size(name)
    v = random_variables(unrolled, (2, size, size, 3))
    shapes = abstract_variables(stacked, (2, size, size, 3))
    vs = {c: stack_like(v[c], shapes[c]) for c in v}
    x = jnp.asarray(np.random.RandomState(0).randn(2, size, size, 3), jnp.float32)
    labels = jnp.array([1, 3])

    def loss(model, variables):
        def f(params):
            logits, _ = model.apply(
                {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
            )
            return optim.classification_loss(logits, labels, logits.shape[-1])

        return jax.value_and_grad(f)(variables['params'])

    np.testing.assert_allclose(unrolled.apply(v, x), stacked.apply(vs, x), rtol=1e-4, atol=1e-5)
    (la, ga), (lb, gb) = (
        jax.jit(lambda v: loss(unrolled, v))(v),
        jax.jit(lambda v: loss(stacked, v))(vs),
    )
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    restacked = traverse_util.flatten_dict(stack_like(ga, gb))
    for path, b in traverse_util.flatten_dict(gb).items():
        np.testing.assert_allclose(
            restacked[path],
            b,
            rtol=1e-3,
            atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7,
            err_msg='/'.join(path),
        )


def _remat_models():
    """One model per family and model class with a ``remat`` option: the one with the fewest
    parameters (the option is wired once per class, the same for every size)."""
    groups = {}
    for name in jaxcnn.list_models():
        if 'remat' in _fields(name):
            key = (jaxcnn.model_info(name).family, type(jaxcnn.create_model(name)))
            groups.setdefault(key, []).append(name)
    return sorted(
        min(g, key=lambda n: jaxcnn.model_info(n).reference_params) for g in groups.values()
    )


REMAT = _remat_models()


def _products(jaxpr, inside):
    """(convolutions and matrix products, those inside ``inside(eqn)`` regions), nested bodies
    included: a region's whole body counts as inside."""
    from jaxcnn.kernels import sub_jaxprs

    total = within = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
            total += 1
            within += inside(eqn)
        for sub in sub_jaxprs(eqn.params.values()):
            t, w = _products(sub, inside)
            total, within = total + t, within + (t if inside(eqn) else w)
    return total, within


def test_every_residual_family_offers_remat():
    families = {jaxcnn.model_info(n).family for n in REMAT}
    assert {
        'resnet',
        'resnet_cifar',
        'convnext',
        'efficientnet',
        'mobilenet',
        'nfnet',
        'revnet',
        'pyramidnet',
        'ghostnet',
        'xception',
        'squeezenext',
        'multiresnet',
        'polynet',
        'shufflenet_v1',
        'shufflenet_v2',
        'hypernet',
        'condconv',
        'dynamic_filter',
    } <= families, families


@pytest.mark.parametrize('name', REMAT)
def test_remat_recomputes_every_product_of_the_stages(name):
    """Traced (plain lax convolutions, no compile): with ``remat=True`` the convolutions and
    matrix products inside checkpointed regions are exactly those the model runs inside its
    stages (counted with
    ``remat=False`` by marking every Stage call's name scope), and there are some."""
    from jaxcnn.layers.stage import Stage

    size = input_size(name)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)

    def in_stage_scope(next_fun, args, kwargs, context):
        if isinstance(context.module, Stage) and context.method_name == '__call__':
            with jax.named_scope('jaxcnn_stage'):
                return next_fun(*args, **kwargs)
        return next_fun(*args, **kwargs)

    # reversible stages rebuild their activations anyway: remat is the alternative to them
    plain = {'reversible': False} if 'reversible' in _fields(name) else {}

    def forward_jaxpr(remat):
        model = jaxcnn.create_model(name, remat=remat, **plain)
        variables = abstract_variables(model, x.shape)
        fn = lambda v, x: model.apply(
            v, x, train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)}
        )
        with jaxcnn.kernels.use(jaxcnn.kernels.PLAIN), nn.intercept_methods(in_stage_scope):
            return jax.make_jaxpr(fn)(variables, x).jaxpr

    staged = _products(
        forward_jaxpr(False), lambda e: 'jaxcnn_stage' in str(e.source_info.name_stack)
    )
    remat = _products(
        forward_jaxpr(True), lambda e: e.primitive.name in ('checkpoint', 'remat', 'remat2')
    )
    assert staged[0] == remat[0]
    assert 0 < staged[1] == remat[1], (staged, remat)


@pytest.mark.parametrize('name', ['resnet20', 'convnext_tiny', 'shufflenet_g1'])
def test_remat_gives_the_stored_gradients(name):
    """Rematerialised and stored activations give the same loss, gradients and BatchNorm
    statistics in training mode (unrolled stages, a scanned stage with layer scale)."""
    size = input_size(name)
    overrides = {'depths': (1, 2, 1, 1)} if name == 'convnext_tiny' else {}
    plain = jaxcnn.create_model(name, drop_path_rate=0.1, **overrides)
    v = random_variables(plain, (2, size, size, 3))
    x = jnp.asarray(np.random.RandomState(0).randn(2, size, size, 3), jnp.float32)

    def step(model):
        def loss(params):
            logits, state = model.apply(
                {**v, 'params': params},
                x,
                train=True,
                mutable=['batch_stats'],
                rngs={'dropout': jax.random.key(3)},
            )
            return optim.classification_loss(logits, jnp.array([1, 3]), logits.shape[-1]), state

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(v['params'])

    (la, sa), ga = step(plain)
    (lb, sb), gb = step(plain.clone(remat=True))
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    for a, b in zip(jax.tree.leaves((ga, sa)), jax.tree.leaves((gb, sb))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(a))) + 1e-8)


def test_remat_lowers_the_peak_memory_of_a_scanned_stage():
    """What remat is for, measured on the compiled training step (XLA's memory analysis, the
    bench's): in a scanned stage the blocks' activations are recomputed inside the backward
    loop, so the peak falls well below that of stored activations (ResNet-20, batch 32). The
    ratio (~0.4 at batch 128 for ResNet-32, BENCHMARKS.md) is a property of the schedule."""
    from jaxcnn.bench.memory import measure_memory

    stored = measure_memory('resnet20:scan_blocks=True', 32, 32)['peak_bytes']
    remat = measure_memory('resnet20:scan_blocks=True:remat=True', 32, 32)['peak_bytes']
    assert remat < 0.6 * stored, (remat, stored)
