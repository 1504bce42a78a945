"""FBNet's differentiable architecture search (DNAS): `python -m jaxcnn.search --config NAME`.

Wu et al. 2019, "FBNet: Hardware-Aware Efficient ConvNet Design via Differentiable Neural
Architecture Search" (CVPR 2019, arXiv:1812.03443). Equation and table numbers are the paper's.

Search space. A fixed macro-architecture (Table 1: stem, stages of ``layers`` searchable layers
with a fixed width and first stride, 1x1 head, classifier) in which every searchable layer
picks one candidate block (Table 2). The candidates here are MBConv inverted residuals
(:class:`jaxcnn.layers.mbconv.MBConv`, kind 'ir': 1x1 expand by e - depthwise kxk - 1x1
project, ReLU, residual when the shape is kept) with kernel 3 or 5 and expansion 1, 3 or 6
(``k3_e1 k3_e3 k3_e6 k5_e1 k5_e3 k5_e6``) and ``skip``. Table 2's two grouped variants
(``k3_e1_g2``, ``k5_e1_g2``: grouped 1x1 convs with a channel shuffle) are left out: MBConv has
no grouped pointwise convolutions. ``skip`` is the identity, so it exists only where a layer
keeps the shape (stride 1, same width); the first layer of a stage that changes the stride or
the width has no skip candidate (its logit is masked to -inf). FBNet's reference code instead
turns such a "skip" into a strided 1x1 conv-BN-ReLU, a block Table 2 does not list; none of the
published FBNet-A/B/C skips such a layer either.

Supernet (§3.4). Layer l outputs x_{l+1} = sum_i m_{l,i} b_{l,i}(x_l) (eq. 4) with
m_l = GumbelSoftmax(theta_l, tau) (eq. 5): softmax((theta_{l,i} + g_{l,i}) / tau), g ~ Gumbel(0,1).
:class:`SuperNet` takes the mixing weights m as an argument: the architecture logits theta are
not Flax parameters, so the weights w and the architecture theta are separate pytrees with
their own optimisers.

Loss (eq. 2): L(a, w) = CE(a, w) * alpha * log(COST(a))^beta, with the differentiable expected
cost COST(a) = sum_l sum_i m_{l,i} COST(b_{l,i}) (eq. 6) from a lookup table (eq. 3):
``cost='flops'`` counts each candidate's multiply-adds at its layer's input shape (with
:func:`jaxcnn.summary.layer_costs`), ``cost='latency'`` times each candidate jitted on this
machine (the paper's latency table, measured on a phone). Only the searchable layers count, as
in eq. 3; skip costs 0. The weight step minimises CE alone: the cost factor does not depend on
w, it would only rescale w's learning rate step by step.

Search (§4.1). The training set is split 80/20 (``search.arch_fraction``); each epoch trains w
on the first part (SGD with momentum, ``config.optim`` / ``config.schedule``), then theta on
the second (Adam, lr ``theta_lr``, weight decay ``theta_weight_decay``); the first
``warmup_epochs`` train w only. The temperature anneals per epoch: tau = tau0 * decay^epoch
(paper: 5.0 and 0.956 = exp(-0.045)). Paper values: alpha 0.2, beta 0.6, theta lr 0.01, weight
decay 5e-4, 90 epochs of which 10 warm-up.

Output, in the workdir: ``architecture.json`` (the argmax architecture as a stage table of
:class:`jaxcnn.models.efficientnet.Row`, skip layers dropped, plus the chosen candidates, a
few architectures sampled from softmax(theta), theta itself and the cost table),
``arch_weights.png`` (softmax(theta), layers x candidates), ``results.json``, ``metrics.jsonl``
and curves. Train the network found with

    python -m jaxcnn.train --config fbnet_search_fmnist:train \\
        --config.model_kwargs.arch=WORKDIR/architecture.json

(the registered model ``fbnet_searched``, :mod:`jaxcnn.models.fbnet_searched`), or register it
under a name of its own with :func:`register_searched`.

Settings are read from ``config.search`` (see configs/fbnet_search_fmnist.py). Data, batch size, epochs, the weight optimiser and augmentation are the trainer's fields.
Runs on one device (``jax.jit``, no data parallelism), with the trainer's pieces
(:mod:`jaxcnn.train`): its data path, its training step for w (the mixing weights as the
model's extra input; label smoothing, MixUp/CutMix and EMA as in training), its batches for
theta's step and its evaluation.

Resuming. Every epoch ends with a checkpoint in ``WORKDIR/checkpoints`` (w's TrainState,
theta and its Adam state, the history so far); running the same command again continues from
the last finished epoch and ends as an uninterrupted search would. SIGTERM stops the search
with exit status 0, keeping that checkpoint (an epoch cut short is run again);
``config.simulate_preemption_at_step`` sends it before that weight step (tests).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcnn
from jaxcnn import checkpoint as ckpt_lib
from jaxcnn import config as config_lib
from jaxcnn import metrics as metrics_lib
from jaxcnn import optim
from jaxcnn import registry
from jaxcnn import sharding
from jaxcnn import train as train_lib
from jaxcnn.layers import ClassifierHead, batch_norm, conv2d, get_act
from jaxcnn.layers.mbconv import MBConv
from jaxcnn.models.efficientnet import MBConvNet, Row, Stages
from jaxcnn.models.fbnet_searched import architecture_json, load_architecture


# ---------------------------------------------------------------------------------------------
# The search space: candidate blocks (Table 2) and macro-architectures (Table 1)
# ---------------------------------------------------------------------------------------------


class Candidate(NamedTuple):
    """One candidate block: an MBConv 'ir' with ``kernel`` and expansion ``exp``; kernel 0 is
    the identity (skip)."""

    name: str
    kernel: int
    exp: int

    @property
    def is_skip(self) -> bool:
        return self.kernel == 0


# Table 2 without the grouped k3_e1_g2 / k5_e1_g2 (see the module docstring).
CANDIDATES = {
    c.name: c
    for c in (
        Candidate('k3_e1', 3, 1),
        Candidate('k3_e3', 3, 3),
        Candidate('k3_e6', 3, 6),
        Candidate('k5_e1', 5, 1),
        Candidate('k5_e3', 5, 3),
        Candidate('k5_e6', 5, 6),
        Candidate('skip', 0, 0),
    )
}
DEFAULT_CANDIDATES = tuple(CANDIDATES)


class MacroStage(NamedTuple):
    """A row of Table 1: ``layers`` searchable layers of width ``out``, the first with ``stride``."""

    out: int
    layers: int
    stride: int


class MacroArch(NamedTuple):
    """A supernet's fixed parts: stem width (3x3 conv, stride 2), stages, 1x1 head width."""

    stem_width: int
    stages: tuple
    num_features: int


# Table 1: 3x3 conv 16 stride 2, then 22 searchable layers (1 + 4 x 5 + 1) at 112 -> 7 px,
# 1x1 conv 1984, average pool, fc.
FBNET_MACRO = MacroArch(
    16,
    (
        MacroStage(16, 1, 1),
        MacroStage(24, 4, 2),
        MacroStage(32, 4, 2),
        MacroStage(64, 4, 2),
        MacroStage(112, 4, 1),
        MacroStage(184, 4, 2),
        MacroStage(352, 1, 1),
    ),
    1984,
)
MACROS = {'fbnet': FBNET_MACRO}


class LayerSpec(NamedTuple):
    """One searchable layer: its stage, input width and size (square), output width, stride."""

    stage: int
    in_ch: int
    in_size: int
    out_ch: int
    stride: int

    @property
    def keeps_shape(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


def conv_out_size(size: int, stride: int) -> int:
    # an odd kernel with PyTorch padding k // 2: floor((n - 1) / s) + 1
    return (size - 1) // stride + 1


def layer_specs(stages: Sequence, stem_width: int, image_size: int) -> tuple:
    """The searchable layers of a macro-architecture at ``image_size`` px (the stem halves it)."""
    specs, ch, size = [], stem_width, conv_out_size(image_size, 2)
    for s, stage in enumerate(stages):
        stage = MacroStage(*stage)
        for i in range(stage.layers):
            stride = stage.stride if i == 0 else 1
            specs.append(LayerSpec(s, ch, size, stage.out, stride))
            ch, size = stage.out, conv_out_size(size, stride)
    return tuple(specs)


def candidate_mask(specs: Sequence[LayerSpec], candidates: Sequence[str]) -> np.ndarray:
    """(layers, candidates) bool: False for skip where the layer changes the shape."""
    return np.array(
        [[not CANDIDATES[c].is_skip or spec.keeps_shape for c in candidates] for spec in specs]
    )


# ---------------------------------------------------------------------------------------------
# The supernet
# ---------------------------------------------------------------------------------------------


class MixedLayer(nn.Module):
    """Eq. 4: sum_i weights[i] * candidate_i(x). Every block has its own weights and BatchNorm;
    a skip candidate where the shape changes is not built (its weight must be 0)."""

    candidates: tuple
    out_ch: int
    stride: int
    act: str = 'relu'
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, weights, train: bool = False):
        keeps_shape = self.stride == 1 and x.shape[-1] == self.out_ch
        weights = weights.astype(x.dtype)
        out = 0.0
        for i, name in enumerate(self.candidates):
            cand = CANDIDATES[name]
            if cand.is_skip:
                if keeps_shape:
                    out = out + weights[i] * x
                continue
            y = MBConv(
                'ir',
                self.out_ch,
                cand.kernel,
                self.stride,
                cand.exp,
                act=self.act,
                bn_eps=self.bn_eps,
                bn_momentum=self.bn_momentum,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(x, train)
            out = out + weights[i] * y
        return out


class SuperNet(nn.Module):
    """Stem - mixed layers of the macro-architecture - 1x1 head - classifier (Table 1).

    ``__call__(x, arch_weights, train)``: arch_weights is (layers, candidates), each row summing
    to 1 (:func:`mixing_weights`). Module names follow :class:`MBConvNet` (``conv_stem``,
    ``bn1``, ``conv_head``, ``bn2``, ``head``), layer l is ``layer_{l}`` and its candidates are
    named as in :data:`CANDIDATES`, so a chosen path maps onto the exported network.
    """

    stages: tuple
    candidates: tuple = DEFAULT_CANDIDATES
    stem_width: int = 16
    num_features: int = 1984
    act: str = 'relu'
    num_classes: int = 10
    drop_rate: float = 0.0
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    def specs(self, image_size: int) -> tuple:
        return layer_specs(self.stages, self.stem_width, image_size)

    @nn.compact
    def __call__(self, x, arch_weights, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bn = lambda name: batch_norm(
            train, name=name, momentum=self.bn_momentum, epsilon=self.bn_eps, **kw
        )
        act = get_act(self.act)
        specs = self.specs(x.shape[1])
        if arch_weights.shape != (len(specs), len(self.candidates)):
            raise ValueError(
                f'arch_weights must be (layers, candidates) = '
                f'{(len(specs), len(self.candidates))}, got {arch_weights.shape}'
            )
        x = jnp.asarray(x, self.dtype or jnp.float32)
        x = act(bn('bn1')(conv2d(self.stem_width, 3, 2, name='conv_stem', **kw)(x)))
        for l, spec in enumerate(specs):
            x = MixedLayer(
                self.candidates,
                spec.out_ch,
                spec.stride,
                self.act,
                self.bn_eps,
                self.bn_momentum,
                name=f'layer_{l}',
                **kw,
            )(x, arch_weights[l], train)
        if self.num_features:
            x = act(bn('bn2')(conv2d(self.num_features, 1, name='conv_head', **kw)(x)))
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


def mixing_weights(theta, mask, tau, rng=None):
    """Eq. 5: softmax((theta + g) / tau) per layer, g ~ Gumbel(0, 1) i.i.d. (no noise when
    ``rng`` is None); masked candidates get weight exactly 0."""
    logits = jnp.where(mask, theta, -jnp.inf)
    if rng is not None:
        logits = logits + jax.random.gumbel(rng, theta.shape, theta.dtype)
    return jax.nn.softmax(logits / tau, axis=-1)


def one_hot_weights(choices: Sequence[int], num_candidates: int):
    """The mixing weights of one architecture (candidate index per layer)."""
    return jax.nn.one_hot(jnp.asarray(choices), num_candidates, dtype=jnp.float32)


# ---------------------------------------------------------------------------------------------
# Cost lookup table (eq. 3) and the loss (eq. 2, 6)
# ---------------------------------------------------------------------------------------------


def candidate_block(spec: LayerSpec, cand: Candidate, act: str = 'relu') -> MBConv:
    return MBConv('ir', spec.out_ch, cand.kernel, spec.stride, cand.exp, act=act)


def candidate_macs(spec: LayerSpec, cand: Candidate) -> int:
    """Multiply-adds of one image through one candidate at its layer (jaxcnn.summary's count
    of the traced block's convolutions; skip: 0)."""
    if cand.is_skip:
        return 0
    from jaxcnn.summary import layer_costs

    return sum(r.macs for r in layer_costs(candidate_block(spec, cand), spec.in_size, spec.in_ch))


def candidate_latency(
    spec: LayerSpec, cand: Candidate, batch: int = 32, repeats: int = 20, seed: int = 0
) -> float:
    """Median seconds of one jitted inference call of the candidate on a batch at its layer's
    input shape, on the default device (skip: 0)."""
    if cand.is_skip:
        return 0.0
    block = candidate_block(spec, cand)
    x = jax.random.normal(jax.random.key(seed), (batch, spec.in_size, spec.in_size, spec.in_ch))
    variables = block.init(jax.random.key(seed), x, train=False)
    fn = jax.jit(lambda v, x: block.apply(v, x, train=False))
    jax.block_until_ready(fn(variables, x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(variables, x))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# Default unit of each cost (raw MACs / seconds are divided by it) and its label.
COST_UNITS = {'flops': (1e6, 'MMACs'), 'latency': (1e-3, 'ms')}


def cost_unit_label(kind: str, unit: float) -> str:
    names = {
        'flops': {1.0: 'MACs', 1e3: 'kMACs', 1e6: 'MMACs', 1e9: 'GMACs'},
        'latency': {1.0: 's', 1e-3: 'ms', 1e-6: 'us'},
    }[kind]
    return names.get(unit, f'x {unit:g} {"MACs" if kind == "flops" else "s"}')


def cost_table(
    specs: Sequence[LayerSpec],
    candidates: Sequence[str],
    kind: str = 'flops',
    unit: float = 0.0,
    latency_batch: int = 32,
) -> np.ndarray:
    """(layers, candidates) cost of each candidate at each layer, in ``unit`` (0: MMACs per
    image for 'flops', milliseconds per batch of ``latency_batch`` for 'latency'); masked
    entries are 0."""
    if kind not in COST_UNITS:
        raise ValueError(f"search.cost must be one of {', '.join(COST_UNITS)}, got {kind!r}")
    unit = unit or COST_UNITS[kind][0]
    mask = candidate_mask(specs, candidates)
    table = np.zeros(mask.shape, np.float64)
    for l, spec in enumerate(specs):
        for k, name in enumerate(candidates):
            if mask[l, k]:
                raw = (
                    candidate_macs(spec, CANDIDATES[name])
                    if kind == 'flops'
                    else candidate_latency(spec, CANDIDATES[name], latency_batch)
                )
                table[l, k] = raw / unit
    return table


def expected_cost(arch_weights, table):
    """Eq. 6: sum_l sum_i m_{l,i} COST(b_{l,i})."""
    return jnp.sum(arch_weights * table)


def search_loss(ce, cost, alpha: float, beta: float):
    """Eq. 2: CE * alpha * log(COST)^beta."""
    return ce * alpha * jnp.log(cost) ** beta


# ---------------------------------------------------------------------------------------------
# Export: chosen candidates -> stage table -> registered model
# ---------------------------------------------------------------------------------------------


def argmax_choices(theta, mask) -> list:
    """Index of the most probable allowed candidate of every layer."""
    return [int(i) for i in np.argmax(np.where(mask, np.asarray(theta), -np.inf), axis=-1)]


def sample_choices(rng, theta, mask) -> list:
    """One architecture drawn from softmax(theta) (each layer independently)."""
    logits = jnp.where(mask, theta, -jnp.inf)
    return [int(i) for i in jax.random.categorical(rng, logits, axis=-1)]


def choices_to_stages(specs: Sequence[LayerSpec], names: Sequence[str]) -> Stages:
    """A stage table of MBConv 'ir' rows: skip layers dropped, consecutive equal blocks of a
    stage merged into one row, the stage's stride on its first row. A stage whose layers all
    chose skip is left out (only shape-keeping layers can skip, so nothing else changes)."""
    stages = []
    for s in sorted({spec.stage for spec in specs}):
        rows = []
        for spec, name in zip(specs, names):
            cand = CANDIDATES[name]
            if spec.stage != s or cand.is_skip:
                continue
            if rows and (rows[-1].kernel, rows[-1].exp) == (cand.kernel, cand.exp):
                rows[-1] = rows[-1]._replace(repeats=rows[-1].repeats + 1)
            else:
                stride = spec.stride if not rows else 1
                rows.append(Row('ir', 1, cand.kernel, stride, cand.exp, spec.out_ch))
        if rows:
            stages.append(tuple(rows))
    return tuple(stages)


def register_searched(
    arch,
    name: str,
    stem_width: int = 16,
    num_features: int = 1984,
    act: str = 'relu',
    num_classes: int = 10,
    input_size: tuple = (28, 28, 1),
    **info,
) -> str:
    """Registers a found network as ``name``: ``arch`` is an architecture.json path (or its
    text), or a stage table of Rows with the given stem/head widths and activation. Returns the
    name; ``jaxcnn.create_model(name)`` then builds it like any other model."""
    if isinstance(arch, str):
        kwargs = load_architecture(arch)
        where = arch if not arch.strip().startswith('{') else 'JSON text'
    else:
        kwargs = dict(
            stages=tuple(tuple(Row(*r) for r in stage) for stage in arch),
            stem_width=stem_width,
            num_features=num_features,
            act=act,
            head_scaling='fixed',
        )
        where = 'a stage table'
    kwargs['drop_rate'] = info.pop('drop_rate', 0.2)
    model = MBConvNet(num_classes=num_classes, **kwargs)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_size)), train=False)
    )
    info.setdefault('family', 'fbnet_searched')
    info.setdefault('reference', f'found by jaxcnn.search ({where})')
    info.setdefault('reference_params', jaxcnn.count_params(shapes['params']))
    registry.register(
        name,
        MBConvNet,
        kwargs,
        input_size=tuple(input_size),
        num_classes=num_classes,
        min_input=8,
        **info,
    )
    return name


# ---------------------------------------------------------------------------------------------
# Settings, state and the two update steps
# ---------------------------------------------------------------------------------------------

# search keys; the search hyper-parameters default to the paper's (§4.1).
SEARCH_DEFAULTS = dict(
    macro='',  # '' = the stages/stem_width/num_features below; 'fbnet' = Table 1
    stages=((24, 2, 2), (32, 2, 2), (64, 2, 1)),  # (out, layers, first stride)
    stem_width=16,
    num_features=256,
    act='relu',
    candidates=DEFAULT_CANDIDATES,
    cost='flops',
    cost_unit=0.0,
    latency_batch=32,
    alpha=0.2,
    beta=0.6,
    tau0=5.0,
    tau_decay=0.956,
    warmup_epochs=10,
    theta_lr=0.01,
    theta_weight_decay=5e-4,
    arch_fraction=0.2,
    num_samples=3,
    eval_batch_size=1000,
)


def search_settings(config) -> dict:
    """config.search merged over SEARCH_DEFAULTS, validated."""
    given = config.get('search', None)
    if not given:
        raise ValueError(
            'this config has no search group; use one made for the '
            'search, e.g. --config fbnet_search_fmnist'
        )
    given = given.to_dict() if hasattr(given, 'to_dict') else dict(given)
    unknown = sorted(set(given) - set(SEARCH_DEFAULTS))
    if unknown:
        raise ValueError(
            f'unknown search key(s) {", ".join(unknown)}; valid: '
            f'{", ".join(sorted(SEARCH_DEFAULTS))}'
        )
    s = {**SEARCH_DEFAULTS, **given}
    if s['macro']:
        if s['macro'] not in MACROS:
            raise ValueError(
                f"search.macro must be '' or one of {', '.join(MACROS)}, got {s['macro']!r}"
            )
        macro = MACROS[s['macro']]
        s.update(stages=macro.stages, stem_width=macro.stem_width, num_features=macro.num_features)
    s['stages'] = tuple(MacroStage(*map(int, st)) for st in s['stages'])
    s['candidates'] = tuple(s['candidates'])
    bad = [c for c in s['candidates'] if c not in CANDIDATES]
    if bad or not s['candidates']:
        raise ValueError(f'search.candidates: unknown {bad}; choose from {", ".join(CANDIDATES)}')
    if not 0 < s['arch_fraction'] < 1:
        raise ValueError(f"search.arch_fraction must be in (0, 1), got {s['arch_fraction']}")
    if s['tau0'] <= 0 or s['tau_decay'] <= 0:
        raise ValueError('search.tau0 and tau_decay must be positive')
    if s['cost'] not in COST_UNITS:
        raise ValueError(f"search.cost must be one of {', '.join(COST_UNITS)}, got {s['cost']!r}")
    return s


@flax.struct.dataclass
class ArchState:
    """The architecture's half of the search state; the weights' half is the trainer's
    TrainState (jaxcnn.train), updated by the trainer's own step."""

    step: jax.Array  # architecture updates done
    theta: jax.Array  # (layers, candidates) architecture logits
    opt_state: object  # theta's Adam


def temperature(settings: dict, epoch: int) -> float:
    """tau = tau0 * decay^epoch (§4.1)."""
    return float(settings['tau0'] * settings['tau_decay'] ** epoch)


# Streams of the weights' key (TrainState.rng) besides the trainer's step keys fold_in(rng, step):
# the Gumbel noise of the weight steps and the keys of the architecture steps. Each is a function
# of (rng, step count), so a resumed search draws what an uninterrupted one would.
ARCH_STREAM, GUMBEL_STREAM = 1 << 30, (1 << 30) + 1


def make_weight_mixing(mask):
    """The mixing weights of the weight step ``step`` (eq. 5): fresh Gumbel noise per step."""

    def weight_mixing(theta, rng, step, tau):
        key = jax.random.fold_in(jax.random.fold_in(rng, GUMBEL_STREAM), step)
        return mixing_weights(theta, mask, tau, key)

    return weight_mixing


def make_arch_step(
    model,
    theta_tx,
    mask,
    table,
    batch_fn,
    num_classes: int,
    smoothing: float,
    alpha: float,
    beta: float,
):
    """One Adam update of the architecture logits theta on a held-out batch, minimising eq. 2
    with the weights w fixed (BatchNorm on batch statistics, running statistics left alone).
    ``batch_fn`` is the trainer's (jaxcnn.train.make_batch_fn): the batches are augmented as the
    weight step's are."""
    table = jnp.asarray(table, jnp.float32)

    def arch_step(arch: ArchState, weights, train_arrays, batch, tau):
        rng = jax.random.fold_in(jax.random.fold_in(weights.rng, ARCH_STREAM), arch.step)
        k_aug, k_gumbel, k_drop = jax.random.split(rng, 3)
        images, targets = batch_fn(k_aug, train_arrays, batch)
        variables = {'params': weights.params, 'batch_stats': weights.batch_stats}

        def loss_fn(theta):
            arch_weights = mixing_weights(theta, mask, tau, k_gumbel)
            logits, _ = model.apply(
                variables,
                images,
                arch_weights,
                train=True,
                rngs={'dropout': k_drop},
                mutable=['batch_stats'],
            )
            ce = optim.classification_loss(logits, targets, num_classes, smoothing)
            cost = expected_cost(arch_weights, table)
            return search_loss(ce, cost, alpha, beta), (ce, cost)

        (loss, (ce, cost)), grads = jax.value_and_grad(loss_fn, has_aux=True)(arch.theta)
        updates, opt_state = theta_tx.update(grads, arch.opt_state, arch.theta)
        theta = optax.apply_updates(arch.theta, updates)
        metrics = {'arch_loss': loss, 'arch_ce': ce, 'expected_cost': cost}
        return arch.replace(step=arch.step + 1, theta=theta, opt_state=opt_state), metrics

    return arch_step


# The per-epoch record of results.json's history, one float column per key (NaN: no value that
# epoch, e.g. the warm-up's architecture metrics). Checkpoints hold these columns as float64
# arrays, so a resumed search writes the history an uninterrupted one would.
HISTORY_KEYS = (
    'loss',
    'accuracy',
    'lr',
    'grad_norm',
    'param_norm',
    'tau',
    'arch_loss',
    'arch_ce',
    'expected_cost',
    'entropy',
    'epoch_seconds',
)


def history_records(history: dict) -> list:
    """Columns {key: [value per epoch]} -> [{'epoch': e, key: value, ...}], NaNs left out."""
    epochs = len(history[HISTORY_KEYS[0]])
    return [
        {'epoch': e, **{k: history[k][e] for k in HISTORY_KEYS if not math.isnan(history[k][e])}}
        for e in range(epochs)
    ]


def plot_arch_weights(
    path: str,
    probs: np.ndarray,
    mask: np.ndarray,
    candidates: Sequence[str],
    specs: Sequence[LayerSpec],
    chosen: Sequence[int],
) -> str:
    """Heatmap of softmax(theta): one row per layer, one column per candidate; the argmax is
    boxed, candidates a layer does not have are marked n/a."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    shown = np.where(mask, probs, np.nan)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(candidates), 1.2 + 0.42 * len(specs)))
    im = ax.imshow(shown, cmap='viridis', vmin=0.0, vmax=1.0, aspect='auto')
    for l in range(len(specs)):
        for k in range(len(candidates)):
            if mask[l, k]:
                ax.text(
                    k,
                    l,
                    f'{probs[l, k]:.2f}',
                    ha='center',
                    va='center',
                    fontsize=7,
                    color='black' if probs[l, k] > 0.6 else 'white',
                )
            else:  # skip where the layer changes the shape
                ax.text(k, l, 'n/a', ha='center', va='center', fontsize=7, color='gray')
        ax.add_patch(
            matplotlib.patches.Rectangle(
                (chosen[l] - 0.5, l - 0.5), 1, 1, fill=False, edgecolor='red', linewidth=1.5
            )
        )
    ax.set_xticks(range(len(candidates)))
    ax.set_xticklabels(candidates, rotation=45, ha='right')
    ax.set_yticks(range(len(specs)))
    ax.set_yticklabels(
        [f'{l}: {s.in_ch}->{s.out_ch} s{s.stride} {s.in_size}px' for l, s in enumerate(specs)],
        fontsize=7,
    )
    ax.set_title('softmax(theta) per searchable layer (argmax boxed)')
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_lines(specs, candidates, probs, chosen, table, unit) -> list:
    lines = [
        f'{"layer":>5}  {"in->out":>9}  {"s":>1}  {"px":>3}  {"chosen":>6}  {"p":>5}  '
        f'{"cost " + unit:>12}'
    ]
    for l, spec in enumerate(specs):
        k = chosen[l]
        lines.append(
            f'{l:>5}  {spec.in_ch:>4}->{spec.out_ch:<4}  {spec.stride:>1}  '
            f'{spec.in_size:>3}  {candidates[k]:>6}  {probs[l, k]:5.2f}  {table[l, k]:12.4f}'
        )
    return lines


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    config, run_name, workdir, _ = config_lib.parse_args(
        sys.argv[1:] if argv is None else argv, tool='jaxcnn.search'
    )
    settings = search_settings(config)
    t_start = time.time()
    print(f'{run_name}: FBNet search on {jax.devices()[0].platform}, workdir {workdir}', flush=True)

    # == Data: the training set split into a weight part and an architecture part ===============
    # The trainer's data path: the dataset (train_subset/test_subset applied) on the device as
    # uint8, each step given only its batch's indices.
    if str(config.dataset).startswith('tfds:'):
        raise ValueError('jaxcnn.search needs an in-memory dataset (fmnist, npz:, folder:)')
    mesh = sharding.make_mesh(1)
    ds, train_arrays, test_arrays, _, (mean, std) = train_lib.load_data(config, mesh, config.model)
    split = np.random.default_rng([config.seed, 1]).permutation(ds.num_train)
    n_arch = int(round(settings['arch_fraction'] * ds.num_train))
    arch_idx, weight_idx = split[:n_arch], split[n_arch:]
    bs = int(config.batch_size)
    if bs < 1:
        raise ValueError(
            f'batch_size={bs}: a batch needs at least one example; raise --config.batch_size'
        )
    w_steps_per_epoch, a_steps_per_epoch = len(weight_idx) // bs, len(arch_idx) // bs
    if w_steps_per_epoch == 0 or a_steps_per_epoch == 0:
        raise ValueError(
            f'batch_size={bs} is larger than a split ({len(weight_idx)} weight / '
            f'{n_arch} architecture examples); lower --config.batch_size'
        )
    num_epochs = int(math.ceil(config.num_epochs))
    if num_epochs <= settings['warmup_epochs']:
        raise ValueError(
            f"num_epochs={config.num_epochs} leaves no architecture epochs after "
            f"search.warmup_epochs={settings['warmup_epochs']}"
        )
    # Optional caps for smoke runs: steps per epoch of each phase (num_steps > 0).
    if config.num_steps > 0:
        w_steps_per_epoch = min(w_steps_per_epoch, int(config.num_steps))
        a_steps_per_epoch = min(a_steps_per_epoch, int(config.num_steps))
    image_size = int(config.image_size)
    test_size = int(config.get('test_image_size', 0) or image_size)
    channels = ds.image_shape[-1]

    def split_batch(order, i):
        """Batch i of an epoch's order of one split, as the trainer's train_batch gives it."""
        return sharding.host_to_global({'idx': order[i * bs : (i + 1) * bs].astype(np.int32)}, mesh)

    print(
        f'data: {len(weight_idx)} images for the weights, {n_arch} for the architecture, '
        f'{ds.num_test} test; {num_epochs} epochs ({settings["warmup_epochs"]} warm-up) of '
        f'{w_steps_per_epoch} + {a_steps_per_epoch} steps of {bs}, {image_size}px',
        flush=True,
    )

    # == Search space and cost table ==============================================================
    candidates = settings['candidates']
    specs = layer_specs(settings['stages'], settings['stem_width'], image_size)
    mask = candidate_mask(specs, candidates)
    t = time.time()
    cost_unit = settings['cost_unit'] or COST_UNITS[settings['cost']][0]
    table = cost_table(specs, candidates, settings['cost'], cost_unit, settings['latency_batch'])
    unit = cost_unit_label(settings['cost'], cost_unit)
    cheapest = float(np.sum(np.min(np.where(mask, table, np.inf), axis=1)))
    if cheapest <= 1.0:
        raise ValueError(
            f'the cheapest architecture costs {cheapest:.3g} {unit} <= 1, where '
            f'log(COST)^beta (eq. 2) is not defined or not increasing; set a smaller '
            f'--config.search.cost_unit'
        )
    print(
        f'search space: {len(specs)} layers x {len(candidates)} candidates '
        f'({int(mask.sum())} allowed); {settings["cost"]} table in {time.time() - t:.1f}s, '
        f'architectures cost {cheapest:.3f}-'
        f'{float(np.sum(np.max(table, axis=1))):.3f} {unit}',
        flush=True,
    )

    # written once the settings have passed their checks: a bad override leaves a finished search's
    # workdir as it was
    ckpt_lib.check_workdir(workdir)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(config.to_json_best_effort(indent=2))

    # == Supernet, optimisers, state ==============================================================
    # The weights' state is the trainer's TrainState (EMA included when config.ema_decay > 0);
    # theta and its Adam state are the ArchState.
    model = SuperNet(
        settings['stages'],
        candidates,
        settings['stem_width'],
        settings['num_features'],
        settings['act'],
        config.num_classes,
    )
    init_variables = lambda rng, theta: model.init(
        rng,
        jnp.zeros((1, image_size, image_size, channels)),
        mixing_weights(theta, mask, 1.0),
        train=False,
    )
    theta0 = jnp.zeros(mask.shape, jnp.float32)  # uniform over the allowed candidates
    abstract = jax.eval_shape(init_variables, jax.random.key(0), theta0)
    total_w_steps = num_epochs * w_steps_per_epoch
    tx = optim.build_optimizer(config, abstract['params'], w_steps_per_epoch, total_w_steps, bs)[0]
    theta_tx = optax.chain(
        optax.add_decayed_weights(settings['theta_weight_decay']), optax.adam(settings['theta_lr'])
    )
    ema = float(config.get('ema_decay', 0.0)) > 0

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        variables = init_variables(init_rng, theta0)
        params = variables['params']
        weights = train_lib.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables['batch_stats'],
            opt_state=tx.init(params),
            ema_params=params if ema else None,
            rng=state_rng,
        )
        arch = ArchState(
            step=jnp.zeros((), jnp.int32), theta=theta0, opt_state=theta_tx.init(theta0)
        )
        return weights, arch

    # Every state array lives on the mesh, as the data does: a step's inputs then have the same
    # shardings at every call, and each step compiles once.
    replicated = sharding.replicated(mesh)
    weights, arch = jax.jit(init, out_shardings=replicated)(jax.random.key(config.seed))
    print(f'supernet: {jaxcnn.count_params(weights.params):,} parameters', flush=True)

    # The trainer's step updates the weights, the Gumbel-sampled mixing weights its model input.
    mask_dev = jnp.asarray(mask)
    weight_step = jax.jit(
        train_lib.make_train_step(config, model, tx, mean, std, image_size, config.num_classes),
        donate_argnums=(0,),
        out_shardings=replicated,
    )
    weight_mixing = jax.jit(make_weight_mixing(mask_dev), out_shardings=replicated)
    batch_fn = train_lib.make_batch_fn(config, mean, std, image_size, config.num_classes)
    arch_step = jax.jit(
        make_arch_step(
            model,
            theta_tx,
            mask_dev,
            table,
            batch_fn,
            config.num_classes,
            float(config.get('label_smoothing', 0.0)),
            settings['alpha'],
            settings['beta'],
        ),
        donate_argnums=(0,),
        out_shardings=replicated,
    )
    eval_step = jax.jit(
        train_lib.make_eval_step(config, model, mean, std, test_size, config.num_classes)
    )

    # == Checkpoint: resume from the workdir =====================================================
    # One checkpoint per finished epoch, numbered by the epochs done: both states, the history
    # so far and the search's seconds so far. The data orders are functions of (seed, epoch) and
    # every key of (rng, step count), so the resumed search continues as if never stopped.
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, 'checkpoints'), keep=config.get('keep_checkpoints', 3)
    )
    history = {k: [] for k in HISTORY_KEYS}
    start_epoch = ckpt.latest_step() or 0
    if start_epoch:
        restored = ckpt.restore(
            {
                'weights': weights,
                'arch': arch,
                'seconds': 0.0,
                'history': {k: np.zeros(start_epoch) for k in HISTORY_KEYS},
            }
        )
        weights, arch = restored['weights'], restored['arch']
        history = {k: [float(v) for v in restored['history'][k]] for k in HISTORY_KEYS}
        t_start = time.time() - restored['seconds']
        print(f'Resumed from {ckpt.directory} at epoch {start_epoch}.', flush=True)

    # == Search loop: per epoch, w on its split, then theta on its split ========================
    writer = metrics_lib.MetricWriter(workdir, tensorboard=False)
    stop = ckpt_lib.StopSignal()  # SIGTERM, Ctrl-C: stop, keep the last finished epoch's checkpoint
    start_step = step = int(weights.step)
    try:
        for epoch in range(start_epoch, num_epochs):
            t_epoch = time.time()
            tau = temperature(settings, epoch)
            order = np.random.default_rng([config.seed, 2, epoch]).permutation(weight_idx)
            w_metrics = []
            for i in range(w_steps_per_epoch):
                if step == config.get('simulate_preemption_at_step', -1) and step > start_step:
                    os.kill(
                        os.getpid(), signal.SIGTERM
                    )  # Tests: as if the scheduler preempted us here.
                if stop:
                    break
                arch_weights = weight_mixing(arch.theta, weights.rng, weights.step, tau)
                weights, m = weight_step(weights, train_arrays, split_batch(order, i), arch_weights)
                w_metrics.append(m)
                step += 1
            if stop:
                break
            record = {k: float(np.mean([float(m[k]) for m in w_metrics])) for k in w_metrics[0]}
            record['tau'] = tau
            if epoch >= settings['warmup_epochs']:
                order = np.random.default_rng([config.seed, 3, epoch]).permutation(arch_idx)
                a_metrics = []
                for i in range(a_steps_per_epoch):
                    if stop:
                        break
                    arch, m = arch_step(arch, weights, train_arrays, split_batch(order, i), tau)
                    a_metrics.append(m)
                if stop:
                    break
                record.update(
                    {k: float(np.mean([float(m[k]) for m in a_metrics])) for k in a_metrics[0]}
                )
            if not all(math.isfinite(v) for v in record.values()):
                print(f'error: non-finite value in epoch {epoch}: {record}', file=sys.stderr)
                writer.close()
                return 1
            probs = np.asarray(mixing_weights(arch.theta, mask, 1.0))
            record['entropy'] = float(
                -np.sum(np.where(mask, probs * np.log(np.maximum(probs, 1e-30)), 0)) / len(specs)
            )
            record['epoch_seconds'] = time.time() - t_epoch
            writer.write(step, record, kind='train')
            for k in HISTORY_KEYS:
                history[k].append(record.get(k, math.nan))
            ckpt.save(
                epoch + 1,
                {
                    'weights': weights,
                    'arch': arch,
                    'seconds': time.time() - t_start,
                    'history': {k: np.asarray(v, np.float64) for k, v in history.items()},
                },
            )
            print(
                f'epoch {epoch}: tau {tau:.3f}, w loss {record["loss"]:.4f} acc '
                f'{record["accuracy"]:.4f}'
                + (
                    f', theta loss {record["arch_loss"]:.4f} (ce '
                    f'{record["arch_ce"]:.4f}, E[cost] '
                    f'{record["expected_cost"]:.3f} {unit})'
                    if 'arch_loss' in record
                    else ', warm-up'
                )
                + f', entropy {record["entropy"]:.3f}, {record["epoch_seconds"]:.0f}s',
                flush=True,
            )
    finally:
        stop.restore()
        ckpt.close()  # Waits for pending saves: what was written stays written.
    if stop:
        writer.close()
        print(
            f'Received {stop.received}: {ckpt.directory} holds the search after '
            f'{len(history["loss"])} of {num_epochs} epochs (an epoch cut short is run again); '
            f'exiting. Run the same command again to resume.',
            flush=True,
        )
        return 130 if stop.received == 'SIGINT' else 0  # the trainer's convention

    # == Evaluation of the supernet ===============================================================
    # The trainer's evaluation, with the mixing weights as the model's extra input.
    search_seconds = time.time() - t_start
    tau = temperature(settings, num_epochs - 1)
    chosen = argmax_choices(arch.theta, mask)
    eval_bs = int(settings['eval_batch_size'])
    test_accuracy = lambda arch_weights: train_lib.evaluate(
        eval_step,
        weights.params,
        weights.batch_stats,
        ds,
        test_arrays,
        eval_bs,
        mesh,
        model_args=(jax.device_put(arch_weights, replicated),),
    )['accuracy']
    results = {
        'supernet_test_accuracy': test_accuracy(mixing_weights(arch.theta, mask, tau)),
        'argmax_path_test_accuracy': test_accuracy(one_hot_weights(chosen, len(candidates))),
    }
    writer.write(
        int(weights.step),
        {
            'accuracy': results['supernet_test_accuracy'],
            'argmax_accuracy': results['argmax_path_test_accuracy'],
        },
        kind='eval',
    )
    writer.close()
    writer.plot()

    # == Export ===================================================================================
    probs = np.asarray(mixing_weights(arch.theta, mask, 1.0))
    names = [candidates[k] for k in chosen]
    stages = choices_to_stages(specs, names)
    samples = []
    for i in range(int(settings['num_samples'])):
        picks = sample_choices(jax.random.key(config.seed + 1000 + i), arch.theta, mask)
        samples.append(
            {
                'choices': [candidates[k] for k in picks],
                'cost': float(sum(table[l, k] for l, k in enumerate(picks))),
            }
        )
    arch_cost = float(sum(table[l, k] for l, k in enumerate(chosen)))
    exported = architecture_json(
        stages,
        settings['stem_width'],
        settings['num_features'],
        settings['act'],
        choices=names,
        cost=arch_cost,
        cost_unit=f'{settings["cost"]} ({unit})',
        image_size=image_size,
        input_channels=int(channels),
        macro={
            'stem_width': settings['stem_width'],
            'num_features': settings['num_features'],
            'stages': [list(s) for s in settings['stages']],
        },
        candidates=list(candidates),
        theta=np.asarray(arch.theta).round(5).tolist(),
        probabilities=probs.round(5).tolist(),
        cost_table=table.round(6).tolist(),
        samples=samples,
    )
    arch_path = os.path.join(workdir, 'architecture.json')
    with open(arch_path, 'w') as f:
        json.dump(exported, f, indent=1)
    plot_path = plot_arch_weights(
        os.path.join(workdir, 'arch_weights.png'), probs, mask, candidates, specs, chosen
    )
    found = MBConvNet(
        stages,
        stem_width=settings['stem_width'],
        num_features=settings['num_features'],
        head_scaling='fixed',
        act=settings['act'],
        num_classes=config.num_classes,
    )
    found_shapes = jax.eval_shape(
        lambda: found.init(
            jax.random.key(0), jnp.zeros((1, image_size, image_size, channels)), train=False
        )
    )
    results.update(
        {
            'search_seconds': search_seconds,
            'epochs': num_epochs,
            'weight_steps': int(weights.step),
            'arch_steps': int(arch.step),
            'supernet_params': jaxcnn.count_params(weights.params),
            'found_params': jaxcnn.count_params(found_shapes['params']),
            'found_cost': arch_cost,
            'cost_unit': unit,
            'choices': names,
            'cost_range': [cheapest, float(np.sum(np.max(table, axis=1)))],
            'history': history_records(history),
        }
    )
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)

    print('\n'.join(summary_lines(specs, candidates, probs, chosen, table, unit)))
    print(
        f'found: {len(names) - names.count("skip")} blocks, {arch_cost:.3f} {unit} in the '
        f'searchable layers, {results["found_params"]:,} parameters'
    )
    print(
        f'supernet test accuracy {results["supernet_test_accuracy"] * 100:.2f}% (softmax '
        f'mixture), {results["argmax_path_test_accuracy"] * 100:.2f}% (argmax path, shared '
        f'weights); search {search_seconds:.0f}s'
    )
    print(
        f'wrote {arch_path}, {plot_path}; train it with: python -m jaxcnn.train --config '
        f'fbnet_search_fmnist:train --config.model_kwargs.arch={arch_path}',
        flush=True,
    )
    return 0


def cli() -> None:
    config_lib.run_cli(main)


if __name__ == '__main__':
    cli()
