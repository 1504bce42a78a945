"""Optimisers, learning-rate schedules, losses and weight EMA for jaxcnn.

Everything is assembled from Optax pieces; the module only adds what Optax
0.2.8 lacks:

* a triangular cyclical schedule (Smith, "Cyclical Learning Rates for Training
  Neural Networks", WACV 2017, arXiv:1506.01186);
* ``unitwise_agc``: Adaptive Gradient Clipping (Brock et al., "High-Performance
  Large-Scale Image Recognition Without Normalization", ICML 2021,
  arXiv:2102.06171) with the paper's unit-wise norms for every shape.  Optax's
  ``adaptive_grad_clip`` agrees for ordinary shapes but squeezes singleton
  axes first, so e.g. a 1x1 conv on a single-channel input (1, 1, 1, O) or a
  Dense kernel with one input (1, O) gets one norm for the whole tensor instead
  of one per output unit;
* a reduce-on-plateau wrapper that also accepts the plain
  ``tx.update(grads, state, params)`` call (Optax requires ``value=``).

Step units
----------
``build_schedule`` works in whatever step unit it is given.  ``build_optimizer``
takes ``steps_per_epoch``/``total_steps`` counted in *trainer steps* (calls to
``tx.update``) and ``global_batch`` = examples per call.  With
``grad_accum_steps = k > 1`` the optimiser only moves every k calls, so the
schedule internally counts optimiser updates (steps / k), ``per_256`` scaling
uses the effective batch ``global_batch * k``, and the returned schedule is a
function of the trainer step (it divides by k itself) for logging.

Reduce on plateau
-----------------
With ``config.schedule.name == 'plateau'`` the chain ends with Optax's
``contrib.reduce_on_plateau``.  Patience counts *evaluations*: after each
evaluation the trainer either calls ``opt_state = plateau_update(opt_state,
eval_loss, config)`` (recommended, no gradient step needed), or passes
``value=eval_loss`` to one ``tx.update(grads, state, params, value=...)``.
Ordinary training steps call ``tx.update(grads, state, params)`` with no value;
those only apply the current scale.  Optax semantics: the lr is multiplied by
``plateau_factor`` once ``plateau_patience`` consecutive evaluations fail to
improve the best value by a relative 1e-4 (PyTorch waits one evaluation more).
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from .layers.stage import is_stacked

__all__ = [
    'OPTIMIZERS',
    'SCHEDULES',
    'base_lr',
    'build_schedule',
    'build_optimizer',
    'unitwise_norm',
    'unitwise_agc',
    'decay_mask',
    'current_lr',
    'plateau_update',
    'cross_entropy',
    'classification_loss',
    'split_outputs',
    'ema_update',
    'param_path',
]

OPTIMIZERS = ('sgd', 'rmsprop', 'adam', 'adamw')
SCHEDULES = ('constant', 'step', 'multistep', 'cosine', 'sgdr', 'cyclic', 'plateau')
LR_SCALINGS = ('none', 'per_256')

# The one table of optimiser and schedule defaults: config.base_config builds its `optim` and
# `schedule` sections from these, and a config that lacks a key (an older file) gets them here.
OPTIM_DEFAULTS = dict(
    name='sgd',
    lr=0.1,
    lr_scaling='none',
    momentum=0.9,
    nesterov=True,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    rmsprop_decay=0.9,
    weight_decay=5e-4,
    decay_exclude='',
    agc_clip=0.0,
    agc_eps=1e-3,
    agc_exclude=r'^head/',
    grad_clip_norm=0.0,
    grad_accum_steps=1,
)
SCHEDULE_DEFAULTS = dict(
    name='cosine',
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


# ----------------------------------------------------------------------------
# small utilities
# ----------------------------------------------------------------------------


def _get(cfg, key: str, defaults: dict):
    if cfg is not None and key in cfg:
        return cfg[key]
    return defaults[key]


def _section(config, name: str):
    if config is None or name not in config:
        return None
    return config[name]


def _check_name(kind: str, name: str, valid: Sequence[str]) -> str:
    name = str(name).lower()
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        raise ValueError(f"Unknown {kind} '{name}'; valid names: {', '.join(valid)}.{hint}")
    return name


def _key_name(k) -> str:
    for attr in ('key', 'name', 'idx'):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_path(path) -> str:
    """'/'-joined name of a key path, e.g. ``'head/fc/kernel'``."""
    return '/'.join(_key_name(k) for k in path)


def _path_mask(params, keep: Callable[[str, Any], bool]):
    return jax.tree_util.tree_map_with_path(lambda p, x: bool(keep(param_path(p), x)), params)


def per_block_ndim(path: str, x) -> int:
    """Rank of one block's parameter: the leading axis of a stage's stacked blocks
    (:func:`jaxcnn.layers.stage.is_stacked`) does not count."""
    return jnp.ndim(x) - int(is_stacked(path))


def _compile(pattern: str, key: str):
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(
            f'config.optim.{key}={pattern!r} is not a valid regular '
            f'expression ({e}); fix the pattern.'
        ) from None


# ----------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------


def base_lr(config, global_batch: int) -> float:
    """Peak learning rate: ``config.optim.lr``, times ``global_batch / 256`` when
    ``lr_scaling == 'per_256'`` (linear scaling rule, Goyal et al. 2017,
    arXiv:1706.02677)."""
    oc = _section(config, 'optim')
    lr = float(_get(oc, 'lr', OPTIM_DEFAULTS))
    scaling = _check_name('lr_scaling', _get(oc, 'lr_scaling', OPTIM_DEFAULTS), LR_SCALINGS)
    if lr <= 0:
        raise ValueError(f'config.optim.lr must be > 0, got {lr}.')
    if scaling == 'per_256':
        if global_batch <= 0:
            raise ValueError(f'global_batch must be > 0 for per_256 scaling, got {global_batch}.')
        lr = lr * global_batch / 256.0
    return lr


def _triangular(min_lr: float, max_lr: float, half_period: int):
    """Smith (2017) triangular policy; starts at ``min_lr`` at step 0."""

    def schedule(step):
        t = jnp.asarray(step, jnp.float32) / half_period
        cycle = jnp.floor(1.0 + t / 2.0)
        x = jnp.abs(t - 2.0 * cycle + 1.0)
        return min_lr + (max_lr - min_lr) * jnp.maximum(0.0, 1.0 - x)

    return schedule


def _add_warmup(main: optax.Schedule, warmup: int) -> optax.Schedule:
    """Linear ramp from 0 to ``main(warmup)`` over ``warmup`` steps, then
    ``main`` at the absolute step (milestones keep counting from step 0)."""
    if warmup <= 0:
        return main
    peak = main(warmup)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), lambda s: main(s + warmup)], [warmup]
    )


def _sgdr_cycles(t0: int, t_mult: float, total_steps: int):
    lengths, covered, length = [], 0, float(t0)
    while covered < total_steps:
        n = max(1, int(round(length)))
        lengths.append(n)
        covered += n
        length *= t_mult
    return lengths


def build_schedule(
    config, steps_per_epoch: int, total_steps: int, base_lr: float
) -> optax.Schedule:
    """Learning-rate schedule from ``config.schedule`` (step -> lr).

    All epoch quantities are converted with ``steps_per_epoch``; every schedule
    counts absolute steps from 0, and a linear warmup (``warmup_steps`` >= 0, or
    ``warmup_epochs``) replaces its first steps.

    * constant: ``base_lr``.  ('plateau' uses this too; the reduction is a
      transformation in the optimiser chain, see the module docstring.)
    * step: ``base_lr * decay_factor ** floor(t / (step_epochs * spe))``.
    * multistep: times ``decay_factor`` at each of ``milestones_epochs``.
    * cosine: linear warmup, then half-cosine from ``base_lr`` to
      ``end_lr_factor * base_lr`` at ``total_steps`` (Loshchilov & Hutter,
      SGDR, ICLR 2017, arXiv:1608.03983).
    * sgdr: cosine cycles restarting at ``base_lr``; the first lasts
      ``sgdr_t0_epochs``, each next one ``sgdr_t_mult`` times longer, as many as
      cover ``total_steps``; the warmup sits inside the first cycle.
    * cyclic: triangular between ``cyclic_min_lr_factor * base_lr`` and
      ``base_lr``, half period ``cyclic_half_period_epochs`` (Smith 2017).
    """
    sc = _section(config, 'schedule')
    g = lambda k: _get(sc, k, SCHEDULE_DEFAULTS)
    name = _check_name('schedule', g('name'), SCHEDULES)
    spe = int(steps_per_epoch)
    total = int(total_steps)
    if spe <= 0 or total <= 0:
        raise ValueError(
            f'steps_per_epoch and total_steps must be > 0, got {steps_per_epoch} and {total_steps}.'
        )
    lr = float(base_lr)
    epochs = lambda e: int(round(float(e) * spe))

    warmup_steps = int(g('warmup_steps'))
    warmup = warmup_steps if warmup_steps >= 0 else epochs(g('warmup_epochs'))
    if warmup >= total and warmup > 0:
        raise ValueError(
            f'Warmup ({warmup} steps) must be shorter than training '
            f'({total} steps); lower schedule.warmup_epochs/steps.'
        )
    decay = float(g('decay_factor'))
    end_lr = lr * float(g('end_lr_factor'))

    if name in ('constant', 'plateau'):
        main = optax.constant_schedule(lr)
    elif name == 'step':
        if not 0.0 < decay <= 1.0:
            raise ValueError(
                f'schedule.decay_factor multiplies the lr and must be in '
                f'(0, 1], got {decay} (use 0.1 to divide by 10).'
            )
        every = epochs(g('step_epochs'))
        if every <= 0:
            raise ValueError(f"schedule.step_epochs must be > 0, got {g('step_epochs')}.")
        main = optax.exponential_decay(lr, every, decay, staircase=True)
    elif name == 'multistep':
        if not 0.0 < decay <= 1.0:
            raise ValueError(
                f'schedule.decay_factor multiplies the lr and must be in '
                f'(0, 1], got {decay} (use 0.1 to divide by 10).'
            )
        bounds = {}
        for m in g('milestones_epochs'):
            b = epochs(m)
            if b <= 0:
                raise ValueError(f'schedule.milestones_epochs must be > 0, got {m}.')
            bounds[b] = bounds.get(b, 1.0) * decay
        main = optax.piecewise_constant_schedule(lr, bounds)
    elif name == 'cosine':
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total, end_value=end_lr
        )
    elif name == 'sgdr':
        t0 = epochs(g('sgdr_t0_epochs'))
        t_mult = float(g('sgdr_t_mult'))
        if t0 <= 0 or t_mult < 1.0:
            raise ValueError(
                f"schedule.sgdr_t0_epochs must be > 0 and sgdr_t_mult "
                f">= 1, got {g('sgdr_t0_epochs')} and {t_mult}."
            )
        lengths = _sgdr_cycles(t0, t_mult, total)
        if warmup >= lengths[0] and warmup > 0:
            raise ValueError(
                f'Warmup ({warmup} steps) must be shorter than the first '
                f'SGDR cycle ({lengths[0]} steps).'
            )
        cycles = [
            dict(
                init_value=0.0 if (i == 0 and warmup) else lr,
                peak_value=lr,
                decay_steps=n,
                warmup_steps=warmup if i == 0 else 0,
                end_value=end_lr,
            )
            for i, n in enumerate(lengths)
        ]
        return optax.sgdr_schedule(cycles)
    elif name == 'cyclic':
        half = epochs(g('cyclic_half_period_epochs'))
        if half <= 0:
            raise ValueError(
                f"schedule.cyclic_half_period_epochs must be > 0, got "
                f"{g('cyclic_half_period_epochs')}."
            )
        main = _triangular(lr * float(g('cyclic_min_lr_factor')), lr, half)
    return _add_warmup(main, warmup)


# ----------------------------------------------------------------------------
# adaptive gradient clipping
# ----------------------------------------------------------------------------


def unitwise_norm(x: jax.Array) -> jax.Array:
    """L2 norm per output unit, broadcast to ``x.shape`` (NFNet definition).

    Scalars/vectors: the whole array; Dense (I, O) and (.., I, O) 3-D kernels:
    over axis 0; conv HWIO: over H, W, I; 3-D conv DHWIO: over D, H, W, I.
    """
    x = jnp.asarray(x)
    if x.ndim <= 1:
        axes = None
    elif x.ndim in (2, 3):
        axes = (0,)
    elif x.ndim in (4, 5):
        axes = tuple(range(x.ndim - 1))
    else:
        raise ValueError(
            f'unitwise_norm: unsupported parameter rank {x.ndim} '
            f'(shape {x.shape}); exclude it via optim.agc_exclude.'
        )
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes, keepdims=True)
    return jnp.broadcast_to(jnp.sqrt(sq), x.shape)


def unitwise_agc(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """Adaptive Gradient Clipping (Brock et al. 2021, arXiv:2102.06171).

    For each unit i: if ``||G_i|| / max(||W_i||, eps) > clipping`` the gradient
    is rescaled to norm ``clipping * max(||W_i||, eps)``. Parameters stacked over
    scanned blocks (``is_stacked``) are clipped block by block, as if unrolled.
    """

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError('unitwise_agc needs params: call tx.update(grads, opt_state, params).')

        def clip(g, w):
            g_norm = unitwise_norm(g)
            max_norm = clipping * jnp.maximum(unitwise_norm(w), eps)
            # The tiny floor only guards the division; where it matters g_norm is
            # below max_norm and the unclipped branch is taken.
            scaled = g * (max_norm / jnp.maximum(g_norm, 1e-12)).astype(g.dtype)
            return jnp.where(g_norm > max_norm, scaled, g)

        def clip_leaf(path, g, w):
            if is_stacked(param_path(path)):
                return jax.vmap(clip)(g, w)
            return clip(g, w)

        return jax.tree_util.tree_map_with_path(clip_leaf, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


# ----------------------------------------------------------------------------
# reduce on plateau
# ----------------------------------------------------------------------------


def _plateau_args(config):
    sc = _section(config, 'schedule')
    factor = float(_get(sc, 'plateau_factor', SCHEDULE_DEFAULTS))
    patience = int(_get(sc, 'plateau_patience', SCHEDULE_DEFAULTS))
    if not 0.0 < factor < 1.0 or patience < 1:
        raise ValueError(
            f'schedule.plateau_factor must be in (0, 1) and '
            f'plateau_patience >= 1, got {factor} and {patience}.'
        )
    return dict(factor=factor, patience=patience)


def _plateau(factor: float, patience: int) -> optax.GradientTransformationExtraArgs:
    """``optax.contrib.reduce_on_plateau`` that tolerates a missing ``value``
    (then it only applies the current scale and leaves its counters alone)."""
    inner = optax.contrib.reduce_on_plateau(factor=factor, patience=patience)

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        if value is None:
            return jax.tree.map(lambda g: (state.scale * g).astype(g.dtype), updates), state
        return inner.update(updates, state, params, value=value)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _is_plateau(x):
    return isinstance(x, optax.contrib.ReduceLROnPlateauState)


def plateau_update(opt_state, value, config):
    """Feeds one evaluation metric (lower is better, e.g. eval loss) to every
    reduce-on-plateau state inside ``opt_state``; returns the new opt_state.
    A no-op for optimisers built without the 'plateau' schedule. Jittable."""
    inner = optax.contrib.reduce_on_plateau(**_plateau_args(config))
    value = jnp.asarray(value, jnp.float32)

    def step(s):
        if not _is_plateau(s):
            return s
        return inner.update((), s, None, value=value)[1]

    return jax.tree.map(step, opt_state, is_leaf=_is_plateau)


# ----------------------------------------------------------------------------
# optimiser
# ----------------------------------------------------------------------------


def decay_mask(params, decay_exclude: str = ''):
    """True where weight decay applies: ``ndim > 1`` and the '/'-joined path does
    not match ``decay_exclude`` (so no decay on biases, norm scales, gains)."""
    rx = _compile(decay_exclude, 'decay_exclude') if decay_exclude else None
    return _path_mask(
        params, lambda p, x: per_block_ndim(p, x) > 1 and not (rx is not None and rx.search(p))
    )


def _lr_transform(learning_rate):
    # Factory for inject_hyperparams: the injected scalar is readable in state.
    return optax.scale_by_learning_rate(learning_rate)


def build_optimizer(config, params, steps_per_epoch: int, total_steps: int, global_batch: int):
    """One ``optax.chain`` from ``config.optim`` / ``config.schedule``.

    Order: global-norm clip -> AGC (masked by ``agc_exclude``) -> L2 decay
    (sgd/rmsprop/adam, PyTorch coupling: added to the gradient before momentum)
    -> optimiser statistics -> decoupled decay (adamw, Loshchilov & Hutter,
    ICLR 2019, arXiv:1711.05101) -> scheduled lr (``inject_hyperparams``, read
    with ``current_lr``) -> reduce-on-plateau scale; the whole chain is wrapped
    in ``optax.MultiSteps`` when ``grad_accum_steps > 1``.

    Update rules match PyTorch: SGD ``buf = mu*buf + g``, step ``buf`` or
    ``g + mu*buf`` (Nesterov); RMSprop ``v = a*v + (1-a) g^2``, step
    ``g / (sqrt(v) + eps)`` with heavy-ball momentum ``optim.momentum``
    (Tieleman & Hinton 2012); Adam/AdamW with bias correction (Kingma & Ba,
    arXiv:1412.6980).

    Args:
      params: parameter tree, used to validate the masks early.
      steps_per_epoch, total_steps: in trainer steps (calls to ``tx.update``).
      global_batch: examples per ``tx.update`` call (all devices).
    Returns:
      ``(tx, schedule)``; ``schedule(trainer_step)`` is the lr before any
      plateau reduction.
    """
    oc = _section(config, 'optim')
    g = lambda k: _get(oc, k, OPTIM_DEFAULTS)
    name = _check_name('optimizer', g('name'), OPTIMIZERS)
    accum = int(g('grad_accum_steps'))
    if accum < 1:
        raise ValueError(f'optim.grad_accum_steps must be >= 1, got {accum}.')
    wd = float(g('weight_decay'))
    momentum = float(g('momentum'))
    if wd < 0 or not 0.0 <= momentum < 1.0:
        raise ValueError(
            f'optim.weight_decay must be >= 0 and optim.momentum in '
            f'[0, 1), got {wd} and {momentum}.'
        )
    sched_name = _check_name(
        'schedule', _get(_section(config, 'schedule'), 'name', SCHEDULE_DEFAULTS), SCHEDULES
    )

    spe_updates = max(1, int(steps_per_epoch) // accum)
    total_updates = max(1, int(total_steps) // accum)
    lr0 = base_lr(config, int(global_batch) * accum)
    schedule = build_schedule(config, spe_updates, total_updates, lr0)

    decay_rx = str(g('decay_exclude') or '')
    agc_rx = _compile(str(g('agc_exclude') or ''), 'agc_exclude')
    agc_pattern = str(g('agc_exclude') or '')
    dmask = lambda p: decay_mask(p, decay_rx)
    decay_mask(params, decay_rx)  # fail early on a bad pattern

    parts = []
    clip = float(g('grad_clip_norm'))
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    agc = float(g('agc_clip'))
    if agc > 0:
        agc_mask = lambda p: _path_mask(
            p, lambda path, x: not (agc_pattern and agc_rx.search(path))
        )
        parts.append(optax.masked(unitwise_agc(agc, float(g('agc_eps'))), agc_mask))
    if wd > 0 and name != 'adamw':
        parts.append(optax.masked(optax.add_decayed_weights(wd), dmask))

    if name == 'sgd':
        if momentum > 0:
            parts.append(optax.trace(decay=momentum, nesterov=bool(g('nesterov'))))
    elif name == 'rmsprop':
        parts.append(
            optax.scale_by_rms(
                decay=float(g('rmsprop_decay')),
                eps=float(g('eps')),
                initial_scale=0.0,
                eps_in_sqrt=False,
            )
        )
        if momentum > 0:
            parts.append(optax.trace(decay=momentum, nesterov=False))
    else:
        parts.append(optax.scale_by_adam(b1=float(g('b1')), b2=float(g('b2')), eps=float(g('eps'))))
        if name == 'adamw' and wd > 0:
            parts.append(optax.masked(optax.add_decayed_weights(wd), dmask))

    parts.append(optax.inject_hyperparams(_lr_transform)(learning_rate=schedule))
    if sched_name == 'plateau':
        parts.append(_plateau(**_plateau_args(config)))

    tx = optax.chain(*parts)
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
        inner_schedule = schedule
        schedule = lambda step: inner_schedule(jnp.asarray(step) // accum)
    return tx, schedule


# inject_hyperparams returns the stateful variant in recent Optax versions.
_INJECT_STATES = tuple(
    getattr(optax, n)
    for n in ('InjectHyperparamsState', 'InjectStatefulHyperparamsState')
    if hasattr(optax, n)
)


def current_lr(opt_state) -> jax.Array:
    """Learning rate used by the most recent update (the scheduled value times
    any reduce-on-plateau scale). After ``init`` it is the lr of step 0."""
    nodes = jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, _INJECT_STATES) or _is_plateau(x)
    )
    lr = None
    scale = jnp.asarray(1.0, jnp.float32)
    for n in nodes:
        if isinstance(n, _INJECT_STATES):
            lr = n.hyperparams['learning_rate']
        elif _is_plateau(n):
            scale = scale * n.scale
    if lr is None:
        raise ValueError(
            'current_lr: opt_state was not made by build_optimizer '
            '(no injected learning_rate found).'
        )
    return jnp.asarray(lr, jnp.float32) * scale


# ----------------------------------------------------------------------------
# losses and EMA
# ----------------------------------------------------------------------------


def cross_entropy(
    logits, targets, num_classes: int, label_smoothing: float = 0.0, reduction: str = 'mean'
):
    """Softmax cross-entropy in float32 (or the logits' wider float type).

    ``targets`` are int labels of shape ``logits.shape[:-1]`` or soft targets of
    shape ``logits.shape`` (e.g. from mixup/cutmix). Label smoothing (Szegedy et
    al., "Rethinking the Inception Architecture", CVPR 2016) mixes the targets
    with the uniform distribution: ``t * (1 - s) + s / K``.
    ``reduction``: 'mean' (scalar) or 'none' (per example).
    """
    logits = jnp.asarray(logits)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    k = logits.shape[-1]
    if k != num_classes:
        raise ValueError(
            f'logits have {k} classes but num_classes={num_classes}; '
            f'set config.num_classes to match the model.'
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}.')
    targets = jnp.asarray(targets)
    if targets.shape == logits.shape and jnp.issubdtype(targets.dtype, jnp.floating):
        t = targets.astype(jnp.float32)
    elif targets.shape == logits.shape[:-1] and jnp.issubdtype(targets.dtype, jnp.integer):
        t = jax.nn.one_hot(targets, k, dtype=jnp.float32)
    else:
        raise ValueError(
            f'targets must be int labels of shape {logits.shape[:-1]} '
            f'or float soft targets of shape {logits.shape}; got '
            f'{targets.dtype} {targets.shape}.'
        )
    if label_smoothing > 0:
        t = t * (1.0 - label_smoothing) + label_smoothing / k
    loss = -jnp.sum(t * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    if reduction == 'mean':
        return jnp.mean(loss)
    if reduction == 'none':
        return loss
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}.")


def split_outputs(outputs):
    """``logits`` or ``(logits, [aux_logits, ...])`` -> ``(logits, aux_list)``."""
    if isinstance(outputs, (tuple, list)):
        if len(outputs) != 2:
            raise ValueError(
                'Model outputs must be logits or (logits, [aux_logits, '
                f'...]); got a sequence of length {len(outputs)}.'
            )
        logits, aux = outputs
        if aux is None:
            aux = []
        elif not isinstance(aux, (tuple, list)):
            aux = [aux]
        return logits, list(aux)
    return outputs, []


AUX_LOSS_WEIGHT = 0.3  # each auxiliary head's share of the loss (Szegedy et al. 2015, §5)


def classification_loss(
    outputs,
    labels,
    num_classes: int,
    label_smoothing: float = 0.0,
    aux_weight: float = AUX_LOSS_WEIGHT,
):
    """Mean CE of the main logits plus ``aux_weight`` times the CE of each
    auxiliary head (GoogLeNet, Szegedy et al. 2015, arXiv:1409.4842, weight 0.3).
    ``outputs``: logits, or ``(logits, [aux_logits, ...])``."""
    logits, aux = split_outputs(outputs)
    loss = cross_entropy(logits, labels, num_classes, label_smoothing)
    for a in aux:
        loss = loss + aux_weight * cross_entropy(a, labels, num_classes, label_smoothing)
    return loss


def ema_update(ema_params, params, decay: float, step=None):
    """Exponential moving average of weights: ``e <- decay*e + (1-decay)*p``.

    Works on any tree (params, or params plus batch_stats). With ``step``
    (number of updates so far) the decay is capped at ``(1+step)/(10+step)`` so
    early averages are not dominated by the random init (the TensorFlow
    ``ExponentialMovingAverage(num_updates=...)`` convention). ``optax.ema``
    averages *updates* inside an optimiser chain and debiases them, which is not
    what evaluation with averaged weights needs, hence this helper.
    """
    d = jnp.asarray(decay, jnp.float32)
    if step is not None:
        s = jnp.asarray(step, jnp.float32)
        d = jnp.minimum(d, (1.0 + s) / (10.0 + s))
    return jax.tree.map(
        lambda e, p: (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(
            e.dtype
        ),
        ema_params,
        params,
    )
