"""Every registered model through the same checks: parameter count against its reference; in
fp32, a jitted forward/backward pass in train and inference mode with every mode of
differentiation (reverse, jax.jvp, jax.linearize, forward-over-reverse Hessian-vector products)
checked against finite differences, under the library's default kernel policy; in bf16, the
jitted pass for one model of each kind and bf16 compute reaching every convolution and product
(traced)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn.kernels import sub_jaxprs as _sub_jaxprs
from jaxcnn.optim import classification_loss, split_outputs
from helpers import (
    abstract_variables,
    jit_once,
    one_per_kind as _one_per_kind,
    shallow_overrides as jit_test_overrides,
    random_variables,
    smallest_per as _smallest_per,
    test_input_size as input_size,
)

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
        assert abs(n - info.reference_params) <= info.params_rounding / 2, (
            n,
            info.reference_params,
        )


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


# The fp32 pass (oneDNN's float32 forms among its kernels) is compiled for one model of each kind,
# the bf16 pass for the smallest of those in each family; every model's passes are traced,
# without a compile (test_bf16_reaches_every_convolution_and_product checks each bf16 layer; a
# bfloat16 compile of XLA:CPU takes about twice an fp32 one, and compiles are most of this
# suite's time).
COMPILED = _one_per_kind(ALL)
BF16_COMPILED = _smallest_per(_one_per_kind(CLASSIFIERS), lambda n: jaxcnn.model_info(n).family)
# Differentiated in every mode against finite differences, compiled: the models whose blocks hold
# the library's own differentiation rules (the kernel policy's forms, the reversible couplings)
# and the odd outputs, each kind once. Every other model traces the same probe, so every rule it
# reaches runs on its shapes.
FINITE_DIFFERENCES = {
    'resnet20': {},  # oneDNN's dense forms, the block boundary
    'resnet18': {},  # at 32 px: maps smaller than the kernel
    'revnet38': {},  # reversible couplings in a scan (loop forms)
    'mobilenetv3_small_050': {},  # depthwise taps, SE, hard-swish
    'convnext_tiny': {'depths': (1, 2, 1, 1)},  # 7x7 depthwise taps in a scan, layer scale
    'shufflenet_g1': {},  # grouped convolutions
    'dynconv_cifar': {},  # kernels computed from the input
    'googlenet': {},  # auxiliary heads in the loss
    'unet_small': {},  # per-pixel logits, transposed convolutions
}


def _check_outputs(variables, train_logits, state, eval_logits, dtype):
    """Logits of the right shape and dtype, finite; running statistics moved by train mode."""
    assert train_logits.shape == eval_logits.shape
    assert eval_logits.dtype == dtype
    assert np.isfinite(np.asarray(eval_logits, np.float32)).all()
    if 'batch_stats' in variables:
        # train mode moves the running statistics; inference mode does not use batch statistics
        before = jax.tree.leaves(variables['batch_stats'])[0]
        after = jax.tree.leaves(state['batch_stats'])[0]
        assert not np.allclose(before, after)


def _check_pass(model, variables, grads, train_logits, state, eval_logits, dtype):
    """What every model's jitted pass must give: the outputs above, and finite fp32 gradients
    reaching the head and the stem."""
    _check_outputs(variables, train_logits, state, eval_logits, dtype)
    # parameters stay fp32 whatever the compute dtype, and gradients reach every one of them
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(variables['params'])):
        assert g.dtype == p.dtype == jnp.float32
        assert np.isfinite(np.asarray(g)).all()
    head_grad = jax.tree.leaves(grads['head'])[0]
    assert np.abs(np.asarray(head_grad)).sum() > 0
    stem_grad = jax.tree.leaves(grads)[0]
    assert np.abs(np.asarray(stem_grad)).sum() > 0


def _model_and_loss(name, dtype, abstract=False, **overrides):
    """The model at its test size with dropout and stochastic depth on, its variables in
    ``dtype`` (their shapes alone where ``abstract``, for a model that is only traced), and its
    loss as a function of the parameters, the mode and the other collections (by default the
    model's own; the trainer's loss: auxiliary heads of GoogLeNet and Inception-v3 add with weight
    0.3; U-Net's pixels take their image's label). Returns (loss, (logits, updated variables))."""
    size = input_size(name)
    model = jaxcnn.create_model(
        name,
        num_classes=7,
        dtype=dtype,
        drop_rate=0.1,
        drop_path_rate=0.1,
        **(overrides or jit_test_overrides(name)),
    )
    shape = (2, size, size, 3)
    variables = abstract_variables(model, shape) if abstract else random_variables(model, shape)
    if dtype == jnp.float64:
        variables = jax.tree.map(lambda t: jnp.asarray(t, jnp.float64), variables)
    x = jnp.asarray(
        np.random.RandomState(1).randn(2, size, size, 3),
        dtype if dtype == jnp.float64 else jnp.float32,
    )
    labels = jnp.array([1, 5])

    def loss_fn(params, train=True, rest=None):
        outputs, state = model.apply(
            {**(variables if rest is None else rest), 'params': params},
            x,
            train=train,
            rngs={'dropout': jax.random.key(0)},
            mutable=['batch_stats'],
        )
        logits = split_outputs(outputs)[0]
        targets = labels.reshape(-1, *[1] * (logits.ndim - 2)) * jnp.ones(
            logits.shape[:-1], jnp.int32
        )
        return classification_loss(outputs, targets, 7), (logits, state)

    return model, variables, loss_fn


def _direction(params, seed):
    """A random direction moving every parameter in proportion to its leaf's scale."""
    rng = np.random.default_rng(seed)

    def leaf(p):
        scale = max(float(jnp.sqrt(jnp.mean(jnp.square(p)))), 1e-2)
        return jnp.asarray(rng.standard_normal(p.shape) * scale, p.dtype)

    return jax.tree.map(leaf, params)


def _differentiation_probe(loss_fn):
    """``probe(params, v, u_head, a, b)``: at p = params + a v + b u, where u moves only the head
    (``u_head``), in inference mode: the loss, the logits, the JVP along v of the loss and of the
    logits by jax.jvp, the loss's by jax.linearize, the reverse-mode <grad, v>, and leaf by leaf
    the projections <grad, v> and <H u, v> of the gradient and of the Hessian-vector product
    (forward over reverse), with |H u| |v| and <|grad|, |v|> per leaf. Projections instead of
    whole leaves keep the outputs small: every returned array is a scalar per leaf."""
    eval_loss = lambda p: loss_fn(p, train=False)
    per_leaf = lambda f, *trees: jnp.stack([f(*xs) for xs in zip(*map(jax.tree.leaves, trees))])

    def probe(params, v, u_head, a, b):
        u = {**jax.tree.map(jnp.zeros_like, params), 'head': u_head}
        p = jax.tree.map(lambda x, dv, du: x + a * dv + b * du, params, v, u)
        ((loss, (logits, _)), grads), (_, hvp) = jax.jvp(
            jax.value_and_grad(eval_loss, has_aux=True), (p,), (u,)
        )
        jvp, (logits_jvp, _) = jax.jvp(eval_loss, (p,), (v,))[1]
        linearized = jax.linearize(lambda q: eval_loss(q)[0], p)[1](v)
        grad_v = per_leaf(jnp.vdot, grads, v)
        return dict(
            loss=loss,
            logits=logits,
            jvp=jvp,
            logits_jvp=logits_jvp,
            linearized=linearized,
            dot=jnp.sum(grad_v),
            grad_v=grad_v,
            grad_v_abs=per_leaf(lambda g, d: jnp.vdot(jnp.abs(g), jnp.abs(d)), grads, v),
            hvp_v=per_leaf(jnp.vdot, hvp, v),
            hvp_bound=per_leaf(lambda h, d: jnp.linalg.norm(h) * jnp.linalg.norm(d), hvp, v),
        )

    return probe


@pytest.mark.parametrize('name', sorted(FINITE_DIFFERENCES))
def test_every_mode_of_differentiation_matches_finite_differences(name):
    """In float64 (so that no ReLU or max-pool kink lies between the points of a difference,
    and rounding stays far below what is compared) and under the library's default kernel
    policy, one compiled program per model gives in inference mode the JVP along a random
    direction v through all parameters (jax.jvp, and jax.linearize for the loss) and the
    Hessian-vector product H u (forward over reverse) along a random direction u through the
    head. Checked against central finite differences of the same program: the JVP of the
    logits against (logits(p + eps v) - logits(p - eps v)) / 2 eps, and H u leaf by leaf
    (projected on v) against (grad(p + eps u) - grad(p - eps u)) / 2 eps; and the loss's JVP
    against reverse mode (the gradient's dot product with v) and linearize. H u's leaves before
    the head are mixed derivatives through every backward convolution. (Training-mode BatchNorm
    on two images makes the loss too sharp for differences; the training pass is checked in
    test_jit_forward_backward.) In float32 the same differences wander by 10-60 % on the thin
    ReLU6 networks (MobileNet-V1 0.25: 62 % at eps 1e-4, 11 % at 3e-6, alike under lax's own
    convolutions): kinks between the points."""
    with jax.enable_x64(True):
        model, variables, loss_fn = _model_and_loss(name, jnp.float64, **FINITE_DIFFERENCES[name])
        # a generic point: the initialiser's zero biases and unit scales put the ReLU inputs of a
        # dead channel exactly on the kink, where differences average the two slopes
        params = jax.tree.map(
            lambda p, d: p + 0.1 * d, variables['params'], _direction(variables['params'], 3)
        )
        assert all(p.dtype == jnp.float64 for p in jax.tree.leaves(params))
        v, u_head = _direction(params, 1), _direction(params['head'], 2)
        probe = jit_once(_differentiation_probe(loss_fn))
        at = lambda a, b: jax.device_get(probe(params, v, u_head, a, b))
        out = at(0.0, 0.0)
        logits_fd = [
            (at(eps, 0.0)['logits'] - at(-eps, 0.0)['logits']) / (2 * eps) for eps in (1e-7, 1e-8)
        ]
        plus_u, minus_u = at(0.0, 1e-5), at(0.0, -1e-5)
    assert out['logits'].dtype == np.float64 and np.isfinite(out['logits']).all()
    jvp = float(out['jvp'])
    # forward mode equals linearize and reverse mode (independent rules: JVPs against transposes)
    np.testing.assert_allclose(float(out['linearized']), jvp, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jvp, float(out['dot']), rtol=1e-8, atol=1e-12)
    # the logits' JVP against their differences: a sign, a factor or a lost branch shows far
    # above the differences' error (eps^2 of the third derivative, rounding 1e-16 / eps), at the
    # better of two steps: a ReLU input that lies within the wider step of zero (RevNet-38 had
    # one at 1e-7) bends that difference alone
    logits_jvp = out['logits_jvp']
    error = min(np.linalg.norm(fd - logits_jvp) for fd in logits_fd)
    assert error < 1e-5 * np.linalg.norm(logits_jvp), (logits_fd, logits_jvp)
    # H u leaf by leaf, projected on v, against the difference of the projected gradients; each
    # leaf within 1e-6 of its largest possible projection |H u| |v|, 1e-4 of itself, and what
    # float64 resolves of a difference of two gradients (8 ulps of <|grad|, |v|> over 2 eps)
    fd = (plus_u['grad_v'] - minus_u['grad_v']) / 2e-5
    hvp_v = out['hvp_v']
    resolution = 8 * np.finfo(np.float64).eps * out['grad_v_abs'] / 2e-5
    allowed = 1e-6 * out['hvp_bound'] + 1e-4 * np.abs(fd) + resolution + 1e-14
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    bad = [(paths[i], hvp_v[i], fd[i]) for i in np.flatnonzero(np.abs(hvp_v - fd) > allowed)]
    assert not bad, bad[:5]
    # the check has something to see: the head's Hessian moves the gradient before the head
    body = np.asarray(['head' not in path for path in paths])
    assert np.abs(hvp_v[body]).max() > 1e3 * allowed[body].min()


@pytest.mark.parametrize('name', ALL)
def test_jit_forward_backward(name):
    """The training and inference pass in float32, compiled for one model of each kind
    (COMPILED) and traced for the others, and for every model jax.jvp, jax.linearize and the
    Hessian-vector product traced through it under the default kernel policy (the
    finite-difference probe above, shapes only: its differentiation rules all run at trace time)."""
    model, variables, loss_fn = _model_and_loss(name, jnp.float32, abstract=name not in COMPILED)

    def step(params, rest=None):
        grads, (train_logits, state) = jax.grad(loss_fn, has_aux=True)(params, rest=rest)
        return grads, train_logits, state, loss_fn(params, train=False, rest=rest)[1][0]

    if name in COMPILED:
        _check_pass(model, variables, *jit_once(step)(variables['params']), jnp.float32)
    else:
        grads, train_logits, state, eval_logits = jax.eval_shape(
            step, variables['params'], variables
        )
        assert eval_logits.dtype == train_logits.dtype == jnp.float32
        assert eval_logits.shape == train_logits.shape
        assert all(
            g.dtype == p.dtype == jnp.float32
            for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(variables['params']))
        )
    shapes = jax.eval_shape(
        lambda rest, *args: _differentiation_probe(functools.partial(loss_fn, rest=rest))(*args),
        variables,
        variables['params'],
        variables['params'],
        variables['params']['head'],
        0.0,
        0.0,
    )
    assert shapes['jvp'].shape == shapes['linearized'].shape == ()
    assert shapes['logits_jvp'].shape == shapes['logits'].shape
    assert shapes['hvp_v'].shape == (len(jax.tree.leaves(variables['params'])),)


@pytest.mark.parametrize('name', BF16_COMPILED)
def test_jit_forward_backward_in_bf16(name):
    model, variables, loss_fn = _model_and_loss(name, jnp.bfloat16)

    @jit_once
    def step(params):
        grads, (train_logits, state) = jax.grad(loss_fn, has_aux=True)(params)
        return grads, train_logits, state, loss_fn(params, train=False)[1][0]

    _check_pass(model, variables, *step(variables['params']), jnp.bfloat16)


# Products that stay float32 in a bfloat16 model by design, as (file, qualified function): the adaptive
# average pool's bin matrices (PyTorch's bins exactly, at HIGHEST precision) and HyperNetworks'
# kernel generator (a kernel made in the parameter dtype, then cast for its convolution).
_FLOAT32_BY_DESIGN = {
    ('layers/conv.py', 'adaptive_avg_pool'),
    ('layers/dynamic.py', 'HyperConv.generate'),
}


def _convolutions_and_products(jaxpr):
    """Every convolution (the kernel policy's forms too), matrix product and foreign call of a
    jaxpr, nested bodies included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in (
            'conv_general_dilated',
            'dot_general',
            'ffi_call',
            'jaxcnn_bilinear',
        ):
            yield eqn
        for sub in _sub_jaxprs(eqn.params.values()):
            yield from _convolutions_and_products(sub)


@pytest.mark.parametrize('name', CLASSIFIERS)
def test_bf16_reaches_every_convolution_and_product(name):
    """A bfloat16 model computes every layer in bfloat16: the forward passes (train and
    inference) traced, not compiled, take no float32 operand into a convolution or product."""
    size = input_size(name)
    model = jaxcnn.create_model(
        name,
        num_classes=7,
        dtype=jnp.bfloat16,
        drop_rate=0.1,
        drop_path_rate=0.1,
        **jit_test_overrides(name),
    )
    variables = abstract_variables(model, (2, size, size, 3))
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    rngs = {'dropout': jax.random.key(0)}
    for train in (True, False):
        jaxpr = jax.make_jaxpr(
            lambda v, x: model.apply(v, x, train=train, rngs=rngs, mutable=['batch_stats'])
        )(variables, x)
        ops = list(_convolutions_and_products(jaxpr.jaxpr))
        assert ops
        float32 = [
            e
            for e in ops
            if any(v.aval.dtype == jnp.float32 for v in e.invars)
            and not any(
                (f.file_name.endswith(path) and f.function_name == fn)
                for f in e.source_info.traceback.frames
                for path, fn in _FLOAT32_BY_DESIGN
            )
        ]
        assert not float32, (
            name,
            train,
            [(e.primitive.name, [str(v.aval) for v in e.invars]) for e in float32[:3]],
        )


def pyramidnet_closed_form(depth, alpha, bottleneck, num_classes=10):
    """Parameters of a PyramidNet counted by hand from the paper's unit definitions."""
    n = 3 * ((depth - 2) // (9 if bottleneck else 6))
    bn = lambda c: 2 * c
    total = 3 * 3 * 3 * 16 + bn(16)
    c_in = 16
    for k in range(1, n + 1):
        d = (16 * n + alpha * k) // n  # eq. 2's floor, in integers
        if bottleneck:
            c_out = 4 * d
            total += bn(c_in) + c_in * d + bn(d) + 9 * d * d + bn(d) + d * c_out + bn(c_out)
        else:
            c_out = d
            total += bn(c_in) + 9 * c_in * d + bn(d) + 9 * d * d + bn(d)
        c_in = c_out
    return total + bn(c_in) + c_in * num_classes + num_classes


@pytest.mark.parametrize(
    'name,overrides',
    [(n, {}) for n in jaxcnn.list_models('pyramidnet*')]
    + [
        # Table 4's alpha-270 rows, built by override (not registered: 0.7-0.8 % above the table)
        ('pyramidnet110_a48', {'alpha': 270}),
        ('pyramidnet272_a200_bottleneck', {'alpha': 270, 'depth': 164}),
    ],
)
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
        convs = 9 * 3 * 16 + sum(
            9 * (c_in * c + c * c) + 9 * (n - 1) * 2 * c * c
            for c_in, c in [(16, 16), (16, 32), (32, 64)]
        )
        bns = 2 * 16 + 2 * 2 * n * (16 + 32 + 64)
        model = jaxcnn.create_model(f'resnet{depth}')
        got = jaxcnn.count_params(abstract_variables(model, (1, 32, 32, 3))['params'])
        assert got == convs + bns + 64 * 10 + 10


def test_shortcut_options_a_b_c():
    """B projects only where the shape changes, C on every block, A never (zero-padding)."""
    count = lambda **kw: jaxcnn.count_params(
        abstract_variables(jaxcnn.create_model('resnet18', **kw), (1, 64, 64, 3))['params']
    )
    b = count(shortcut='B')
    assert b == 11_689_512
    # blocks that keep their shape: two in layer1 (64 ch), the second of layers 2-4
    identity_blocks = [64, 64, 128, 256, 512]
    assert count(shortcut='C') == b + sum(c * c + 2 * c for c in identity_blocks)
    projections = [(64, 128), (128, 256), (256, 512)]
    assert count(shortcut='A') == b - sum(ci * co + 2 * co for ci, co in projections)


@pytest.mark.parametrize(
    'name,overrides',
    [
        ('resnet20', {}),
        ('resnetv2_50', {}),
        ('wrn_16_8', {'block_dropout': 0.0}),
        ('pyramidnet110_a48', {'depth': 20}),
    ],
)
def test_stochastic_depth_on_every_residual_family(name, overrides):
    size = input_size(name)
    x = jnp.asarray(np.random.RandomState(0).randn(4, size, size, 3), jnp.float32)

    def outputs(rate):
        model = jaxcnn.create_model(name, drop_path_rate=rate, **overrides)
        v = random_variables(model, x.shape)
        run = lambda k: model.apply(
            v, x, train=True, rngs={'dropout': jax.random.key(k)}, mutable=['batch_stats']
        )[0]
        return run(0), run(1)

    a, b = outputs(0.0)
    np.testing.assert_allclose(a, b, rtol=1e-6)  # nothing random without drop-path
    a, b = outputs(0.5)
    assert not np.allclose(a, b)  # blocks are dropped per sample
