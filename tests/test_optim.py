"""Tests for jaxcnn.optim against independent NumPy re-implementations."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxcnn import optim


def make_config(optim_kw=None, sched_kw=None):
    c = ml_collections.ConfigDict()
    c.optim = ml_collections.ConfigDict(
        dict(
            name='sgd',
            lr=0.1,
            lr_scaling='none',
            momentum=0.9,
            nesterov=False,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            rmsprop_decay=0.9,
            weight_decay=0.0,
            decay_exclude='',
            agc_clip=0.0,
            agc_eps=1e-3,
            agc_exclude=r'^head/',
            grad_clip_norm=0.0,
            grad_accum_steps=1,
        )
    )
    c.schedule = ml_collections.ConfigDict(
        dict(
            name='constant',
            warmup_epochs=0.0,
            warmup_steps=-1,
            end_lr_factor=0.0,
            step_epochs=30,
            milestones_epochs=(),
            decay_factor=0.1,
            sgdr_t0_epochs=10,
            sgdr_t_mult=2,
            cyclic_min_lr_factor=0.1,
            cyclic_half_period_epochs=2,
            plateau_factor=0.1,
            plateau_patience=5,
        )
    )
    c.optim.update(optim_kw or {})
    c.schedule.update(sched_kw or {})
    return c


def sched_values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


# ---------------------------------------------------------------- schedules


def test_constant_and_per_256():
    c = make_config({'lr': 0.1, 'lr_scaling': 'per_256'})
    assert optim.base_lr(c, 1024) == pytest.approx(0.4)
    assert optim.base_lr(make_config({'lr': 0.1}), 1024) == pytest.approx(0.1)
    s = optim.build_schedule(c, 10, 100, 0.4)
    np.testing.assert_allclose(sched_values(s, [0, 50, 99, 500]), 0.4, rtol=1e-6)


def test_step_schedule():
    spe, base = 7, 0.5
    c = make_config(sched_kw={'name': 'step', 'step_epochs': 3, 'decay_factor': 0.2})
    s = optim.build_schedule(c, spe, 200, base)
    steps = np.array([0, 1, 20, 21, 22, 41, 42, 100, 199])
    want = base * 0.2 ** np.floor(steps / (3 * spe))
    np.testing.assert_allclose(sched_values(s, steps), want, rtol=1e-5)


def test_multistep_schedule():
    spe, base = 5, 1.0
    c = make_config(
        sched_kw={'name': 'multistep', 'milestones_epochs': (2, 5, 9), 'decay_factor': 0.1}
    )
    s = optim.build_schedule(c, spe, 100, base)
    steps = np.array([0, 9, 10, 11, 24, 25, 44, 45, 99])
    want = base * 0.1 ** np.array([np.sum(t >= np.array([10, 25, 45])) for t in steps])
    np.testing.assert_allclose(sched_values(s, steps), want, rtol=1e-5)


def test_cosine_with_warmup():
    spe, total, base, end = 10, 200, 0.8, 0.05
    c = make_config(sched_kw={'name': 'cosine', 'warmup_epochs': 2.0, 'end_lr_factor': end})
    s = optim.build_schedule(c, spe, total, base)
    w = 20
    steps = np.array([0, 5, 10, 19, 20, 21, 60, 110, 150, 199, 200, 250])

    def ref(t):
        if t < w:
            return base * t / w
        frac = min(t - w, total - w) / (total - w)
        return base * end + (base - base * end) * 0.5 * (1 + math.cos(math.pi * frac))

    np.testing.assert_allclose(
        sched_values(s, steps), [ref(t) for t in steps], rtol=1e-5, atol=1e-7
    )


def test_warmup_steps_overrides_epochs_and_composes_with_step():
    base = 1.0
    c = make_config(
        sched_kw={
            'name': 'step',
            'step_epochs': 4,
            'decay_factor': 0.5,
            'warmup_epochs': 3.0,
            'warmup_steps': 8,
        }
    )
    s = optim.build_schedule(c, 10, 100, base)
    steps = np.array([0, 4, 7, 8, 39, 40, 80])
    # linear ramp over 8 steps, then the step schedule at the absolute step
    want = [base * t / 8 if t < 8 else base * 0.5 ** (t // 40) for t in steps]
    np.testing.assert_allclose(sched_values(s, steps), want, rtol=1e-5)


def test_sgdr_restarts_and_cycle_lengths():
    spe, total, base, end = 4, 100, 1.0, 0.1
    c = make_config(
        sched_kw={
            'name': 'sgdr',
            'sgdr_t0_epochs': 2,
            'sgdr_t_mult': 2,
            'end_lr_factor': end,
            'warmup_steps': 3,
        }
    )
    s = optim.build_schedule(c, spe, total, base)
    # cycles of 8, 16, 32, 64 steps cover 100 steps
    starts = np.array([0, 8, 24, 56])
    lengths = np.array([8, 16, 32, 64])

    def ref(t):
        i = np.searchsorted(starts, t, side='right') - 1
        u, n = t - starts[i], lengths[i]
        if i == 0 and u < 3:
            return base * u / 3
        w = 3 if i == 0 else 0
        frac = (u - w) / (n - w)
        return end + (base - end) * 0.5 * (1 + math.cos(math.pi * frac))

    steps = np.arange(0, 100)
    got = sched_values(s, steps)
    np.testing.assert_allclose(got, [ref(t) for t in steps], rtol=1e-5, atol=1e-6)
    # restarts: back at the peak exactly at each cycle start after the first
    np.testing.assert_allclose(got[starts[1:]], base, rtol=1e-6)
    assert np.all(got[starts[1:] - 1] < 0.2)


def test_cyclic_triangular():
    spe, base, fmin = 5, 0.6, 0.1
    c = make_config(
        sched_kw={'name': 'cyclic', 'cyclic_half_period_epochs': 2, 'cyclic_min_lr_factor': fmin}
    )
    s = optim.build_schedule(c, spe, 200, base)
    half = 10
    lo = base * fmin
    steps = np.arange(0, 60)
    # piecewise-linear: up for `half` steps, down for `half` steps, repeat
    phase = steps % (2 * half)
    tri = np.where(phase <= half, phase / half, (2 * half - phase) / half)
    want = lo + (base - lo) * tri
    np.testing.assert_allclose(sched_values(s, steps), want, rtol=1e-5, atol=1e-7)


def test_unknown_names_raise_with_suggestion():
    with pytest.raises(ValueError, match="Did you mean 'cosine'"):
        optim.build_schedule(make_config(sched_kw={'name': 'cosin'}), 10, 100, 0.1)
    params = {'w': jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="valid names: sgd, rmsprop, adam, adamw"):
        optim.build_optimizer(make_config({'name': 'adamm'}), params, 10, 100, 128)
    with pytest.raises(ValueError, match='lr_scaling'):
        optim.base_lr(make_config({'lr_scaling': 'sqrt'}), 128)


# ---------------------------------------------------------------- optimisers

A = {'w': np.array([[1.0, 2.0, 0.5], [0.3, 1.5, 4.0]]), 'b': np.array([2.0, 0.7])}
C = {'w': np.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]), 'b': np.array([-1.0, 3.0])}
P0 = {'w': np.array([[1.0, 1.0, -1.0], [0.0, 2.0, 1.0]]), 'b': np.array([0.5, -0.5])}


def quad_grad(p):
    return {k: A[k] * (p[k] - C[k]) for k in p}


def run_optax(config, n=5):
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), P0)
    tx, _ = optim.build_optimizer(config, params, 100, 1000, 256)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(n):
        grads = jax.tree.map(
            lambda x: jnp.asarray(x, jnp.float32), quad_grad(jax.tree.map(np.asarray, params))
        )
        upd, state = update(grads, state, params)
        params = optax.apply_updates(params, upd)
    return jax.tree.map(np.asarray, params)


def numpy_reference(
    kind, lr, wd, n=5, mu=0.9, nesterov=False, alpha=0.9, eps=1e-8, b1=0.9, b2=0.999
):
    """PyTorch update rules; weight decay only on 'w' (ndim > 1)."""
    p = {k: v.copy() for k, v in P0.items()}
    st = {k: {} for k in p}
    for t in range(1, n + 1):
        g = quad_grad(p)
        for k in p:
            gk = g[k].copy()
            d = wd if k == 'w' else 0.0
            s = st[k]
            if kind != 'adamw':
                gk = gk + d * p[k]
            if kind == 'sgd':
                s['buf'] = gk if t == 1 else mu * s['buf'] + gk
                step = gk + mu * s['buf'] if nesterov else s['buf']
            elif kind == 'rmsprop':
                s['v'] = alpha * s.get('v', 0.0) + (1 - alpha) * gk**2
                r = gk / (np.sqrt(s['v']) + eps)
                if mu > 0:
                    s['buf'] = mu * s.get('buf', 0.0) + r
                    r = s['buf']
                step = r
            else:
                if kind == 'adamw':
                    p[k] = p[k] * (1 - lr * d)
                s['m'] = b1 * s.get('m', 0.0) + (1 - b1) * gk
                s['v'] = b2 * s.get('v', 0.0) + (1 - b2) * gk**2
                mh = s['m'] / (1 - b1**t)
                vh = s['v'] / (1 - b2**t)
                step = mh / (np.sqrt(vh) + eps)
            p[k] = p[k] - lr * step
    return p


@pytest.mark.parametrize(
    'kind,kw',
    [
        ('sgd', dict(momentum=0.9, nesterov=False, weight_decay=0.05)),
        ('sgd', dict(momentum=0.9, nesterov=True, weight_decay=0.05)),
        ('rmsprop', dict(momentum=0.0, weight_decay=0.01, eps=1e-3)),
        ('rmsprop', dict(momentum=0.9, weight_decay=0.01, eps=1e-3)),
        ('adam', dict(weight_decay=0.02)),
        ('adamw', dict(weight_decay=0.3)),
    ],
)
def test_optimizer_matches_numpy(kind, kw):
    lr = 0.05
    c = make_config(dict(name=kind, lr=lr, **kw))
    got = run_optax(c)
    want = numpy_reference(
        kind,
        lr,
        kw['weight_decay'],
        mu=kw.get('momentum', 0.9),
        nesterov=kw.get('nesterov', False),
        eps=kw.get('eps', 1e-8),
    )
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6)


def test_decay_mask():
    params = {
        'stem': {'conv': {'kernel': jnp.ones((3, 3, 1, 4))}},
        'block': {
            'conv': {'kernel': jnp.ones((3, 3, 4, 4)), 'bias': jnp.ones(4)},
            'bn': {'scale': jnp.ones(4), 'bias': jnp.ones(4)},
            'gain': jnp.ones(()),
            'skip_gain': jnp.ones(()),
        },
        'head': {'fc': {'kernel': jnp.ones((4, 10)), 'bias': jnp.ones(10)}},
    }
    m = optim.decay_mask(params)
    assert m['stem']['conv']['kernel'] and m['block']['conv']['kernel']
    assert m['head']['fc']['kernel']
    assert not any(
        [
            m['block']['conv']['bias'],
            m['block']['bn']['scale'],
            m['block']['bn']['bias'],
            m['block']['gain'],
            m['block']['skip_gain'],
            m['head']['fc']['bias'],
        ]
    )
    m = optim.decay_mask(params, r'^stem/|^head/')
    assert not m['stem']['conv']['kernel'] and not m['head']['fc']['kernel']
    assert m['block']['conv']['kernel']
    # through the optimiser: sgd, zero grads, the only movement is weight decay
    c = make_config(
        dict(name='sgd', lr=1.0, momentum=0.0, weight_decay=0.1, decay_exclude=r'^stem/')
    )
    tx, _ = optim.build_optimizer(c, params, 10, 100, 128)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(upd['block']['conv']['kernel'], -0.1)
    np.testing.assert_allclose(upd['head']['fc']['kernel'], -0.1)
    for leaf in [
        upd['stem']['conv']['kernel'],
        upd['block']['conv']['bias'],
        upd['block']['bn']['scale'],
        upd['block']['gain'],
    ]:
        np.testing.assert_allclose(leaf, 0.0)


# ---------------------------------------------------------------- AGC


def numpy_agc(g, w, lam, eps):
    """Unit = one output unit (last axis) for ndim >= 2, whole array otherwise."""
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    out = g.copy()
    if w.ndim <= 1:
        units = [(Ellipsis,)]
    else:
        units = [(Ellipsis, o) for o in range(w.shape[-1])]
        if w.ndim == 3:  # (I, H, O) multi-head dense: unit = (h, o)
            units = [(slice(None), h, o) for h in range(w.shape[1]) for o in range(w.shape[2])]
    for u in units:
        gn = np.sqrt(np.sum(g[u] ** 2))
        wn = max(np.sqrt(np.sum(w[u] ** 2)), eps)
        if gn / wn > lam:
            out[u] = g[u] * lam * wn / gn
    return out


def random_tree(rng):
    shapes = {
        'stem': {'conv': {'kernel': (3, 3, 1, 6)}},
        'pw1': {'kernel': (1, 1, 1, 5)},  # 1x1 conv, 1 input channel
        'block': {
            'conv': {'kernel': (3, 3, 4, 5), 'bias': (5,)},
            'dense': {'kernel': (7, 3)},
            'dense1': {'kernel': (1, 4)},  # one input feature
            'gain': (),
        },
        'zero': {'kernel': (3, 3, 2, 2)},  # exercises eps
        'head': {'fc': {'kernel': (6, 10), 'bias': (10,)}},
    }
    leaves, tdef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    ws, gs = [], []
    for s in leaves:
        w = rng.normal(size=s)
        # per-unit gradient scales over several decades: some clip, some not
        scale = 10.0 ** rng.uniform(-3, 1, size=s[-1:] if len(s) >= 2 else ())
        ws.append(w)
        gs.append(rng.normal(size=s) * scale)
    params = jax.tree.unflatten(tdef, ws)
    params['zero']['kernel'] = np.zeros((3, 3, 2, 2))
    return params, jax.tree.unflatten(tdef, gs)


def test_unitwise_agc_matches_numpy():
    rng = np.random.default_rng(0)
    lam, eps = 0.05, 1e-3
    params, grads = random_tree(rng)
    tx = optim.unitwise_agc(lam, eps)
    f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
    got, _ = tx.update(f32(grads), tx.init(f32(params)), f32(params))
    want = jax.tree.map(lambda g, w: numpy_agc(g, w, lam, eps), grads, params)
    n_clipped = 0
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w_ = want
        for k in path:
            w_ = w_[k.key]
        np.testing.assert_allclose(
            np.asarray(g), w_, rtol=1e-5, atol=1e-8, err_msg=optim.param_path(path)
        )
    for g0, g1 in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        n_clipped += int(not np.allclose(g0, g1))
    assert n_clipped >= 3  # the test really exercises clipping


def test_agc_in_optimizer_exempts_head():
    rng = np.random.default_rng(1)
    lam, eps = 0.02, 1e-3
    params, grads = random_tree(rng)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) * 100.0, grads)
    c = make_config(
        dict(name='sgd', lr=1.0, momentum=0.0, weight_decay=0.0, agc_clip=lam, agc_eps=eps)
    )
    tx, _ = optim.build_optimizer(c, params, 10, 100, 128)
    upd, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(
        upd['head']['fc']['kernel'], -grads['head']['fc']['kernel'], rtol=1e-6
    )
    np.testing.assert_allclose(upd['head']['fc']['bias'], -grads['head']['fc']['bias'], rtol=1e-6)
    want = numpy_agc(grads['block']['conv']['kernel'], params['block']['conv']['kernel'], lam, eps)
    np.testing.assert_allclose(-upd['block']['conv']['kernel'], want, rtol=1e-5)
    assert not np.allclose(want, grads['block']['conv']['kernel'])


def test_agc_clips_scanned_blocks_one_by_one():
    # a stage's ``stacked`` module stacks its blocks on a leading axis: clipping must equal clipping
    # every block's parameters on their own (NumPy reference, block by block)
    rng = np.random.default_rng(3)
    lam, eps = 0.05, 1e-3
    shapes = {'conv': (3, 3, 4, 5), 'dense': (7, 3), 'gain': (), 'bias': (5,)}
    n_blocks = 4
    w = {k: rng.normal(size=(n_blocks,) + s) for k, s in shapes.items()}
    # per-block, per-unit gradient scales over several decades: some units clip, some not
    unit_scale = lambda s: (
        10.0 ** rng.uniform(-3, 1, size=(n_blocks,) + (1,) * max(len(s) - 1, 0) + s[-1:])
    )
    g = {k: rng.normal(size=(n_blocks,) + s) * unit_scale(s) for k, s in shapes.items()}
    params, grads = {'stage': {'stacked': {'block': w}}}, {'stage': {'stacked': {'block': g}}}
    tx = optim.unitwise_agc(lam, eps)
    f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
    got, _ = tx.update(f32(grads), tx.init(f32(params)), f32(params))
    n_clipped = 0
    for k in shapes:
        want = np.stack([numpy_agc(g[k][i], w[k][i], lam, eps) for i in range(n_blocks)])
        np.testing.assert_allclose(
            np.asarray(got['stage']['stacked']['block'][k]), want, rtol=1e-5, atol=1e-8, err_msg=k
        )
        n_clipped += int(not np.allclose(want, g[k]))
    assert n_clipped >= 2


def test_decay_mask_counts_block_rank_for_scanned_params():
    block = {
        'conv': {'kernel': jnp.zeros((3, 3, 3, 4, 4))},
        'bn': {'scale': jnp.zeros((3, 4))},
        'gain': jnp.zeros((3,)),
    }
    params = {
        'layer1': {'stacked': {'block': block}},
        'conv': {'kernel': jnp.zeros((3, 3, 4, 4)), 'bias': jnp.zeros((4,))},
    }
    mask = optim.decay_mask(params)
    stacked = mask['layer1']['stacked']['block']
    assert stacked['conv']['kernel'] and mask['conv']['kernel']
    assert not stacked['bn']['scale']
    assert not stacked['gain'] and not mask['conv']['bias']


# ---------------------------------------------------------------- accumulation


def test_grad_accumulation_equals_step_on_mean_gradient():
    rng = np.random.default_rng(2)
    params = {
        'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        'b': jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    gs = [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        for _ in range(3)
    ]
    kw = dict(name='adamw', lr=0.01, weight_decay=0.1)
    tx3, sched3 = optim.build_optimizer(
        make_config(dict(kw, grad_accum_steps=3)), params, 30, 300, 64
    )
    st, p = tx3.init(params), params
    for i, g in enumerate(gs):
        upd, st = tx3.update(g, st, p)
        if i < 2:
            assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(upd))
        p = optax.apply_updates(p, upd)
    tx1, _ = optim.build_optimizer(make_config(kw), params, 10, 100, 64)
    mean_g = jax.tree.map(lambda *x: sum(x) / 3.0, *gs)
    upd1, _ = tx1.update(mean_g, tx1.init(params), params)
    p1 = optax.apply_updates(params, upd1)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the returned schedule counts trainer steps
    c = make_config(
        dict(grad_accum_steps=4, lr=0.1, lr_scaling='per_256'),
        dict(name='step', step_epochs=1, decay_factor=0.5),
    )
    _, s = optim.build_optimizer(c, params, 40, 400, 64)
    # effective batch 256 -> lr 0.1; one epoch = 40 trainer steps
    np.testing.assert_allclose(sched_values(s, [0, 39, 40, 80]), [0.1, 0.1, 0.05, 0.025], rtol=1e-6)


# ---------------------------------------------------------------- plateau, lr


def test_reduce_on_plateau_and_current_lr():
    params = {'w': jnp.ones((2, 2))}
    c = make_config(
        dict(name='sgd', lr=0.4, momentum=0.0),
        dict(name='plateau', plateau_factor=0.5, plateau_patience=2),
    )
    tx, _ = optim.build_optimizer(c, params, 10, 100, 128)
    st = tx.init(params)
    g = {'w': jnp.ones((2, 2))}
    upd, st = tx.update(g, st, params)  # plain call, no value
    np.testing.assert_allclose(upd['w'], -0.4, rtol=1e-6)
    lrs = []
    for v in [1.0, 0.8, 0.85, 0.9, 0.95, 0.99, 0.7]:
        st = optim.plateau_update(st, v, c)
        lrs.append(float(optim.current_lr(st)))
    # patience 2: 0.85, 0.9 fail to beat 0.8 -> halve; 0.95, 0.99 -> halve again
    np.testing.assert_allclose(lrs, [0.4, 0.4, 0.4, 0.2, 0.2, 0.1, 0.1], rtol=1e-6)
    upd, st = tx.update(g, st, params)
    np.testing.assert_allclose(upd['w'], -0.1, rtol=1e-6)
    # value passed through the ordinary update call also feeds the plateau logic
    for v in [2.0, 2.0]:
        upd, st = tx.update(g, st, params, value=jnp.asarray(v))
    np.testing.assert_allclose(upd['w'], -0.05, rtol=1e-6)


def test_current_lr_tracks_schedule():
    params = {'w': jnp.ones((2, 2))}
    c = make_config(
        dict(name='adam', lr=1.0), dict(name='multistep', milestones_epochs=(1,), decay_factor=0.1)
    )
    tx, sched = optim.build_optimizer(c, params, 3, 30, 128)
    st = tx.init(params)
    got = []
    for _ in range(5):
        _, st = tx.update(params, st, params)
        got.append(float(optim.current_lr(st)))
    # lr used by updates 0..4
    np.testing.assert_allclose(got, [1, 1, 1, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(got, sched_values(sched, range(5)), rtol=1e-6)


# ---------------------------------------------------------------- losses, EMA


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_label_smoothing_and_soft_targets():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 5)) * 3
    labels = rng.integers(0, 5, size=6)
    eps = 0.1
    t = np.full((6, 5), eps / 5)
    t[np.arange(6), labels] += 1 - eps
    want = np.mean(-(t * np_log_softmax(logits)).sum(-1))
    got = optim.cross_entropy(
        jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 5, label_smoothing=eps
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    soft = rng.dirichlet(np.ones(5), size=6)
    got = optim.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(soft, jnp.float32), 5)
    assert got.dtype == jnp.float32
    want = np.mean(
        -(soft * np_log_softmax(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64))).sum(-1)
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    per = optim.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 5, reduction='none')
    np.testing.assert_allclose(per, -np_log_softmax(logits)[np.arange(6), labels], rtol=1e-5)
    with pytest.raises(ValueError, match='num_classes'):
        optim.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 10)


def test_classification_loss_with_aux_heads():
    rng = np.random.default_rng(4)
    main, a1, a2 = (rng.normal(size=(4, 3)) for _ in range(3))
    labels = rng.integers(0, 3, size=4)
    ce = lambda z: np.mean(-np_log_softmax(z)[np.arange(4), labels])
    f = lambda z: jnp.asarray(z, jnp.float32)
    got = optim.classification_loss((f(main), [f(a1), f(a2)]), jnp.asarray(labels), 3)
    np.testing.assert_allclose(got, ce(main) + 0.3 * (ce(a1) + ce(a2)), rtol=1e-5)
    got = optim.classification_loss(f(main), jnp.asarray(labels), 3)
    np.testing.assert_allclose(got, ce(main), rtol=1e-5)


def test_ema_update():
    e = {'a': jnp.asarray([1.0, 2.0]), 'b': {'c': jnp.asarray(3.0)}}
    p = {'a': jnp.asarray([3.0, 0.0]), 'b': {'c': jnp.asarray(-1.0)}}
    out = optim.ema_update(e, p, 0.9)
    np.testing.assert_allclose(out['a'], [1.2, 1.8], rtol=1e-6)
    np.testing.assert_allclose(out['b']['c'], 2.6, rtol=1e-6)
    out = optim.ema_update(e, p, 0.999, step=0)  # decay capped at 1/10
    np.testing.assert_allclose(out['a'], [2.8, 0.2], rtol=1e-6)
