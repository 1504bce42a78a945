"""Per-layer cost table of any registered model: `python -m jaxcnn.summary NAME [--input 224]`.

The table the lectures draw for AlexNet, VGG-16 and GoogLeNet's stem, one row per
convolution, fully connected layer and pooling, read from the traced forward pass (the jaxpr),
so it covers every family without per-model code:

  layer | input C/H/W | filters | kernel | stride | pad | output C/H/W | memory KB | params |
  MACs | receptive field

Definitions (per image):
  * memory (KB) = output elements x 4 bytes / 1024 (fp32 activations);
  * params = weights + biases of the layer's module;
  * MACs (multiply-adds): convolution = output elements x (C_in / groups x K_h x K_w);
    fully connected = C_in x C_out; any other product with a layer's parameters (CondConv's
    mixing of expert kernels by the routing weights) = output elements x contracted length,
    as a `product` row whose parameters stay with the layer it feeds; pooling = output
    elements x K_h x K_w; global average pooling = input elements;
  * receptive field r and jump j along the execution order: r += (K - 1) * j, j *= stride
    (r = 1 + L (K - 1) for L stacked stride-1 KxK convs). Exact for chain networks; for
    multi-branch ones it follows the branches in the order they run.

Where the definitions coincide (no padding) XLA's cost analysis gives 2 FLOPs per MAC here plus
the element-wise work (activations, BatchNorm, residual sums, bias adds): tests/test_summary.py
checks this on LeNet-5. They differ in two ways: XLA does not count the taps of a convolution
that fall on zero padding (AlexNet at 224: XLA's figure is 0.92 x 2 x the MACs here), and it
counts element-wise work this table leaves out (see :func:`xla_flops`).

`python -m jaxcnn.summary NAME --features` prints instead one row per feature-pyramid level
(``create_model(NAME, features_only=True)``): its module, output C/H/W, reduction, and the exact
receptive field and jump of its units in input pixels (per side, along H), propagated variable by
variable through the traced pyramid (see :func:`feature_levels`), so residual sums and concatenated
branches count the branch with the larger field. A level marked ``+ global`` also depends on the
whole image through a global pooling (squeeze-and-excitation, GroupNorm statistics, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
from fractions import Fraction
from typing import List, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.extend.core import Literal

import jaxcnn
from jaxcnn.config import integer_at_least
from jaxcnn import kernels


@dataclasses.dataclass
class LayerCost:
    layer: str
    kind: str  # conv | fc | product | maxpool | avgpool | gap
    input_chw: tuple
    output_chw: tuple
    filters: Optional[int] = None
    kernel: Optional[tuple] = None
    stride: Optional[tuple] = None
    pad: Optional[tuple] = None
    groups: int = 1
    params: int = 0
    macs: int = 0
    receptive_field: int = 1

    @property
    def memory_kb(self) -> float:
        return float(np.prod(self.output_chw)) * 4 / 1024


def _chw(shape) -> tuple:
    # NHWC (or (N, features) for fc layers) -> the lecture's (C, H, W)
    return (shape[-1], shape[1], shape[2]) if len(shape) == 4 else (shape[-1],)


def _module_params(params_by_path, path: str) -> dict:
    return {k: v for k, v in params_by_path.items() if k.rsplit('/', 1)[0] == path}


def _sub_jaxprs(eqn):
    """(closed or open jaxpr, repeat count) pairs nested in an equation (pjit, scan, remat, ...)."""
    out = []
    for key, value in eqn.params.items():
        items = value if isinstance(value, (tuple, list)) else [value]
        for item in items:
            jaxpr = getattr(item, 'jaxpr', item)
            if hasattr(jaxpr, 'eqns'):
                repeat = int(eqn.params.get('length', 1)) if eqn.primitive.name == 'scan' else 1
                out.append((jaxpr, repeat))
    return out


def layer_costs(
    name_or_model, input_size: int = 224, channels: int = 3, num_classes: Optional[int] = None
) -> List[LayerCost]:
    """Rows of the per-layer table for one image of ``input_size`` x ``input_size``."""
    if isinstance(name_or_model, str):
        kwargs = {} if num_classes is None else {'num_classes': num_classes}
        model = jaxcnn.create_model(name_or_model, **kwargs)
    else:
        model = name_or_model
    x = jnp.zeros((1, input_size, input_size, channels), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    flat = traverse_util.flatten_dict(variables.get('params', {}), sep='/')
    params_by_path = {k: int(np.prod(v.shape)) for k, v in flat.items()}
    shapes_by_path = {k: tuple(v.shape) for k, v in flat.items()}
    # a forward trace of what the model computes: its convolutions as the plain lax ops it states
    # (the kernel policy's forms would hide which operand is the kernel)
    with kernels.use(kernels.PLAIN):
        closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    root = type(model).__name__
    rows: List[LayerCost] = []
    rf, jump = 1, 1
    seen_modules = set()

    def module_path(eqn):
        stack = str(eqn.source_info.name_stack)
        parts = [
            p
            for p in stack.split('/')
            if p
            and '->' not in p  # einsum specs
            and '.' not in p  # a method's frame
            and not p.startswith(
                ('jit(', 'vmap(', 'scan', 'remat', 'checkpoint', 'transpose', 'jvp')
            )
        ]
        if parts and parts[0] == root:
            parts = parts[1:]
        return '/'.join(parts)

    def params_of(path, stacked):
        # a scanned module holds its blocks' weights stacked: each pass owns 1/stacked of them;
        # a module applied twice (shared weights) owns its parameters once
        own = sum(_module_params(params_by_path, path).values())
        if stacked > 1:
            return own // stacked
        if path in seen_modules:
            return 0
        seen_modules.add(path)
        return own

    def walk(jaxpr, repeat, prefix=''):
        nonlocal rf, jump
        for eqn in jaxpr.eqns:
            prim = eqn.primitive.name
            subs = _sub_jaxprs(eqn)
            if prim == 'scan':  # one pass of the body per scanned block
                length = int(eqn.params['length'])
                # a scan body's name stack starts at the scanned module: prefix its parents
                inner = '/'.join(p for p in (prefix, module_path(eqn)) if p)
                for _ in range(length):
                    walk(subs[0][0], repeat * length, inner)
                continue
            if subs:  # pjit, remat, custom_jvp, ...: the primal body once
                walk(subs[0][0], repeat, prefix)
                continue
            in_shape = tuple(eqn.invars[0].aval.shape) if eqn.invars else ()
            out_shape = tuple(eqn.outvars[0].aval.shape)
            path = '/'.join(p for p in (prefix, module_path(eqn)) if p)
            if prim == 'conv_general_dilated':
                kshape = tuple(eqn.invars[1].aval.shape)  # HWIO
                groups = int(eqn.params['feature_group_count'])
                stride = tuple(eqn.params['window_strides'])
                pad = tuple(tuple(p) for p in eqn.params['padding'])
                kh, kw = kshape[0], kshape[1]
                macs = int(np.prod(out_shape[1:])) * kshape[2] * kh * kw
                rf += (kh - 1) * jump
                jump *= stride[0]
                rows.append(
                    LayerCost(
                        path or 'conv',
                        'conv',
                        _chw(in_shape),
                        _chw(out_shape),
                        filters=kshape[3],
                        kernel=(kh, kw),
                        stride=stride,
                        pad=tuple(p[0] for p in pad),
                        groups=groups,
                        params=params_of(path, repeat),
                        macs=macs,
                        receptive_field=rf,
                    )
                )
            elif prim == 'dot_general':
                # a product with one of the module's own parameters: a fully connected layer
                # (2-D kernel, applied at every position), or another product such as
                # CondConv's mixing of expert kernels by the routing weights
                operands = [tuple(v.aval.shape) for v in eqn.invars[:2]]
                own = [s for k, s in shapes_by_path.items() if k.rsplit('/', 1)[0] == path]

                def is_own(shape):  # scanned modules hold their weights stacked in front
                    return any(
                        len(o) >= len(shape) and o[len(o) - len(shape) :] == shape for o in own
                    )

                if not any(is_own(o) for o in operands):
                    continue
                (contracted, w_contracted), _ = eqn.params['dimension_numbers']
                depth = int(np.prod([operands[0][d] for d in contracted]))
                macs = int(np.prod(out_shape)) * depth  # the batch is one image
                if len(operands[1]) == 2 and is_own(operands[1]) and tuple(w_contracted) == (0,):
                    rows.append(
                        LayerCost(
                            path or 'fc',
                            'fc',
                            _chw(in_shape),
                            _chw(out_shape),
                            filters=operands[1][1],
                            params=params_of(path, repeat),
                            macs=macs,
                            receptive_field=rf,
                        )
                    )
                else:  # its parameters are counted on the layer they feed
                    batched = not all(is_own(o) for o in operands)
                    rows.append(
                        LayerCost(
                            f'{path}/product' if path else 'product',
                            'product',
                            operands[0][1:] if batched and not is_own(operands[0]) else operands[0],
                            out_shape[1:] if batched else out_shape,
                            macs=macs,
                            receptive_field=rf,
                        )
                    )
            elif prim in ('reduce_window_max', 'reduce_window_sum', 'reduce_window'):
                window = tuple(eqn.params['window_dimensions'])[1:3]
                stride = tuple(eqn.params['window_strides'])[1:3]
                pad = tuple(p[0] for p in eqn.params['padding'])[1:3]
                if len(in_shape) != 4 or window == (1, 1):
                    continue
                rf += (window[0] - 1) * jump
                jump *= stride[0]
                kind = 'maxpool' if prim == 'reduce_window_max' else 'avgpool'
                rows.append(
                    LayerCost(
                        f'{path}/{kind}' if path else kind,
                        kind,
                        _chw(in_shape),
                        _chw(out_shape),
                        kernel=window,
                        stride=stride,
                        pad=pad,
                        macs=int(np.prod(out_shape[1:])) * window[0] * window[1],
                        receptive_field=rf,
                    )
                )
            elif (
                prim == 'reduce_sum' and len(in_shape) == 4 and tuple(eqn.params['axes']) == (1, 2)
            ):
                rows.append(
                    LayerCost(
                        f'{path}/global_pool' if path else 'global_pool',
                        'gap',
                        _chw(in_shape),
                        (in_shape[-1],),
                        macs=int(np.prod(in_shape[1:])),
                        receptive_field=rf,
                    )
                )

    walk(closed.jaxpr, 1)
    return rows


def xla_flops(name: str, input_size: int = 224, channels: int = 3) -> float:
    """FLOPs of one image's forward pass from XLA's cost analysis of the compiled model (traced
    under the plain kernel policy: XLA counts no FLOPs in oneDNN calls)."""
    model = jaxcnn.create_model(name)
    x = jnp.zeros((1, input_size, input_size, channels), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    with kernels.use(kernels.PLAIN):
        lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops'])


@dataclasses.dataclass
class FeatureLevel:
    index: int
    module: str
    output_chw: tuple
    reduction: int
    receptive_field: Union[int, Fraction]  # input pixels per side (H) seen by one unit
    jump: Union[int, Fraction]  # input pixels between neighbouring units (the effective stride)
    global_context: bool = False  # also depends on the whole image (a global pooling upstream)


@dataclasses.dataclass(frozen=True)
class _Field:
    """Receptive field r and jump j of an image-derived variable; ``g``: it also depends on the
    whole image through a spatial reduction."""

    r: Union[int, Fraction]
    j: Union[int, Fraction]
    g: bool = False


_IMAGE = _Field(1, 1)
# reductions that read every position of the axes they reduce
_REDUCTIONS = {
    'reduce_sum',
    'reduce_max',
    'reduce_min',
    'reduce_prod',
    'reduce_and',
    'reduce_or',
    'argmax',
    'argmin',
}
# call-like primitives whose one sub-jaxpr maps the equation's operands to its results
_CALL_PARAMS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')


def _num(x):
    """An int where the Fraction is whole (for display and comparison with ints)."""
    return int(x) if isinstance(x, Fraction) and x.denominator == 1 else x


def _widest(fields) -> Optional[_Field]:
    """Where several image-derived inputs meet (a residual sum, a concatenation): the larger
    field, the branches being centred alike (as Araujo et al. assume); global if any is."""
    fields = [f for f in fields if f is not None]
    if not fields:
        return None
    best = max(fields, key=lambda f: (f.r, f.j))
    return dataclasses.replace(best, g=any(f.g for f in fields))


def _window(f: _Field, k: int, stride: int, dilation: int = 1, base_dilation: int = 1) -> _Field:
    """A sliding window of ``k`` taps (dilated by ``dilation``) and ``stride`` over an input
    dilated by ``base_dilation`` (a transposed convolution): r += (taps on real positions - 1) j,
    j *= stride / base_dilation."""
    k_eff = (k - 1) * dilation + 1
    real = -(-k_eff // base_dilation)  # at most this many window taps fall on input positions
    return _Field(_num(f.r + (real - 1) * f.j), _num(Fraction(f.j) * stride / base_dilation), f.g)


def _spatial_axes(ndim: int) -> set:
    # image-derived tensors are NHWC, (N, L, C) after a flattening, or NH...C: the axes between
    # the batch and the channels are spatial
    return set(range(1, ndim - 1)) if ndim >= 3 else set()


def _propagate(jaxpr, fields: list) -> list:
    """The fields of ``jaxpr``'s outputs from those of its inputs (None: not image-derived)."""
    env = {}

    def read(v):
        return None if isinstance(v, Literal) else env.get(v)

    for v, f in zip(jaxpr.invars, fields):
        if f is not None:
            env[v] = f
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        ins = [read(v) for v in eqn.invars]
        if all(f is None for f in ins):
            continue  # parameters and constants only
        outs = _equation(eqn, prim, ins)
        for v, f in zip(eqn.outvars, outs):
            if f is not None:
                env[v] = f
    return [read(v) for v in jaxpr.outvars]


def _equation(eqn, prim: str, ins: list) -> list:
    n_out = len(eqn.outvars)
    params = eqn.params
    if prim == 'scan':  # a stage of identical blocks: the body applied to the carry `length` times
        body = params['jaxpr'].jaxpr
        n_consts, n_carry = int(params['num_consts']), int(params['num_carry'])
        consts, carry = ins[:n_consts], ins[n_consts : n_consts + n_carry]
        xs = ins[n_consts + n_carry :]
        ys = [None] * (n_out - n_carry)
        for _ in range(int(params['length'])):
            outs = _propagate(body, consts + carry + xs)
            carry, ys = outs[:n_carry], [_widest([a, b]) for a, b in zip(ys, outs[n_carry:])]
        return carry + ys
    if prim == 'cond':  # any branch may run: the widest of theirs
        outs = [_propagate(b.jaxpr, ins[1:]) for b in params['branches']]
        return [_widest([o[i] for o in outs]) for i in range(n_out)]
    if not prim.startswith('reduce'):  # pjit, remat, custom_jvp/custom_vjp calls, closed_call
        for key in _CALL_PARAMS:
            sub = params.get(key)
            sub = getattr(sub, 'jaxpr', sub)
            if hasattr(sub, 'eqns') and len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
                return _propagate(sub, ins)
    if prim == 'conv_general_dilated':
        lhs, rhs = ins[0], ins[1]
        if lhs is None:  # only the kernel comes from the image
            return [rhs] * n_out
        dims = params['dimension_numbers']
        k = eqn.invars[1].aval.shape[dims.rhs_spec[2]]  # the first spatial axis: H
        out = _window(
            lhs,
            k,
            params['window_strides'][0],
            (params.get('rhs_dilation') or (1,))[0],
            (params.get('lhs_dilation') or (1,))[0],
        )
        return [_widest([out, rhs])] * n_out  # a kernel from the image: through a reduction
    if prim.startswith('reduce_window') and ins[0] is not None:
        shape = eqn.invars[0].aval.shape
        if len(shape) >= 3:  # pooling over H (axis 1 of NHWC)
            pick = lambda key: (params.get(key) or (1,) * len(shape))[1]
            out = _window(
                ins[0],
                pick('window_dimensions'),
                pick('window_strides'),
                pick('window_dilation'),
                pick('base_dilation'),
            )
            return [out] * n_out
    f = _widest(ins)
    if prim in _REDUCTIONS or prim == 'dot_general':
        # a reduction over spatial axes (global pooling, GroupNorm's statistics, a product
        # contracting positions) reads the whole image
        if prim == 'dot_general':
            (lhs_c, rhs_c), _ = params['dimension_numbers']
            reads = zip(ins[:2], eqn.invars[:2], (lhs_c, rhs_c))
        else:
            reads = [(ins[0], eqn.invars[0], params['axes'])]
        if any(i is not None and set(a) & _spatial_axes(v.aval.ndim) for i, v, a in reads):
            f = dataclasses.replace(f, g=True)
    elif prim == 'slice' and params.get('strides') and ins[0] is not None:
        strides = params['strides']  # x[:, ::s, ::s]: a subsampling shortcut
        if len(strides) >= 3:
            f = _Field(f.r, _num(f.j * strides[1]), f.g)
    elif prim == 'reshape' and ins[0] is not None:
        a, b = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        if len(a) == 4 and len(b) >= 5 and b[1] * b[2] == a[1] and b[1] < a[1]:
            f = _window(f, b[2], b[2])  # space-to-depth: (N, H/s, s, W/s, s, C), an s x s/s window
        elif len(b) == 4 and len(a) >= 5 and a[1] * a[2] == b[1] and a[1] < b[1]:
            f = _Field(f.r, _num(Fraction(f.j) / a[2]), f.g)  # depth-to-space: j / s
    elif prim == 'pad' and ins[0] is not None and len(params['padding_config']) >= 3:
        interior = params['padding_config'][1][2]  # zeros between rows: a fractional stride
        if interior:
            f = _Field(f.r, _num(Fraction(f.j) / (interior + 1)), f.g)
    return [f] * n_out


def feature_levels(name_or_pyramid, input_size: int = 224, channels: int = 3) -> List[FeatureLevel]:
    """One row per feature-pyramid level of a registered model (or a ``FeaturePyramid``) on one
    ``input_size`` x ``input_size`` image: its module, output C/H/W, reduction, and the receptive
    field and jump (effective stride) of its units, in input pixels along H.

    Exact and structural: the pyramid's forward pass is traced (shapes only, convolutions as the
    plain ``conv_general_dilated``) and every variable of the jaxpr carries (r, j), starting at
    (1, 1) on the image. A convolution or pooling of K taps (dilation d) and stride s gives
    r + ((K - 1) d) j and j s; an operation with several image-derived inputs (a residual sum, a
    concatenation) takes the one with the larger r; parameters and constants carry nothing;
    calls, remat and custom-derivative bodies map their operands to their results, a ``scan``
    (a stage of identical blocks) applies its body to the carry ``length`` times. A strided
    slice (a subsampling shortcut) multiplies j, space-to-depth by s is an s x s window of stride
    s, depth-to-space divides j by s; a reduction over spatial axes marks the level
    ``global_context``: its units then depend on the whole image besides their r x r window.
    Other upsampling (resizes) leaves j unchanged (decoders are not levels).
    """
    from jaxcnn.layers.features import FeaturePyramid
    from jaxcnn.layers.features import feature_info as _feature_info

    if isinstance(name_or_pyramid, str):
        pyramid = jaxcnn.create_model(name_or_pyramid, features_only=True)
    elif isinstance(name_or_pyramid, FeaturePyramid):
        pyramid = name_or_pyramid
    else:
        raise TypeError(f'expected a model name or a FeaturePyramid, got {name_or_pyramid!r}')
    shape = (input_size, input_size, channels)
    info = _feature_info(pyramid.backbone, shape, pyramid.out_indices)
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    variables = jax.eval_shape(lambda x: pyramid.init(jax.random.key(0), x), x)
    with kernels.use(kernels.PLAIN):
        closed = jax.make_jaxpr(lambda v, x: pyramid.apply(v, x))(variables, x)
    # the operands flatten as (variables..., x): only the image is image-derived
    n_in = len(closed.jaxpr.invars)
    fields = _propagate(closed.jaxpr, [None] * (n_in - 1) + [_IMAGE])
    if len(fields) != len(info):
        raise RuntimeError(f'{len(fields)} outputs for {len(info)} feature levels')
    rows = []
    for level, f, out in zip(info, fields, closed.jaxpr.outvars):
        if f is None:  # cannot happen for a map computed from the image
            raise RuntimeError(f'level {level["module"]} does not depend on the image')
        rows.append(
            FeatureLevel(
                index=level['index'],
                module=level['module'],
                output_chw=_chw(out.aval.shape),
                reduction=level['reduction'],
                receptive_field=f.r,
                jump=f.j,
                global_context=f.g,
            )
        )
    return rows


def format_features(rows: List[FeatureLevel]) -> str:
    """The feature-level table: level, module, output C/H/W, reduction, receptive field, jump."""
    header = ('level', 'module', 'output C/H/W', 'reduction', 'RF', 'jump')
    body = [
        (
            str(r.index),
            r.module,
            'x'.join(str(v) for v in r.output_chw),
            str(r.reduction),
            str(r.receptive_field) + (' + global' if r.global_context else ''),
            str(r.jump),
        )
        for r in rows
    ]
    return _align([header] + body, rules_after=(0,), left=2)


def _align(lines, rules_after=(0,), left: int = 1) -> str:
    """Columns padded to their widest cell (the first ``left`` left-aligned, the rest right),
    two spaces apart, with a rule under each line index in ``rules_after``."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for i, line in enumerate(lines):
        out.append(
            '  '.join(
                c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))
            )
        )
        if i in rules_after:
            out.append('-' * len(out[-1]))
    return '\n'.join(out)


def format_table(rows: List[LayerCost], total_params: Optional[int] = None) -> str:
    fmt_chw = lambda t: 'x'.join(str(v) for v in t)
    fmt_t = lambda t: (
        '' if t is None else (str(t[0]) if len(set(t)) == 1 else 'x'.join(map(str, t)))
    )
    header = (
        'layer',
        'input C/H/W',
        'filters',
        'kernel',
        'stride',
        'pad',
        'output C/H/W',
        'memory KB',
        'params',
        'MACs',
        'RF',
    )
    body = [
        (
            r.layer + (f' (g={r.groups})' if r.groups > 1 else ''),
            fmt_chw(r.input_chw),
            '' if r.filters is None else str(r.filters),
            fmt_t(r.kernel),
            fmt_t(r.stride),
            fmt_t(r.pad),
            fmt_chw(r.output_chw),
            f'{r.memory_kb:,.1f}',
            f'{r.params:,}',
            f'{r.macs:,}',
            str(r.receptive_field),
        )
        for r in rows
    ]
    layer_params = sum(r.params for r in rows)
    totals = (
        'total',
        '',
        '',
        '',
        '',
        '',
        '',
        f'{sum(r.memory_kb for r in rows):,.1f}',
        f'{layer_params:,}',
        f'{sum(r.macs for r in rows):,}',
        '',
    )
    lines = [header] + body + [totals]
    if total_params is not None and total_params != layer_params:
        lines.append(
            (
                '(norms, scales, other)',
                '',
                '',
                '',
                '',
                '',
                '',
                '',
                f'{total_params - layer_params:,}',
                '',
                '',
            )
        )
        lines.append(('model total', '', '', '', '', '', '', '', f'{total_params:,}', '', ''))
    return _align(lines, rules_after=(0, len(body)), left=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m jaxcnn.summary',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('model', help='a registered model name (see jaxcnn.list_models())')
    parser.add_argument(
        '--input',
        type=integer_at_least(1),
        default=0,
        help='square input size (default: the model\'s)',
    )
    parser.add_argument(
        '--channels',
        type=integer_at_least(1),
        default=0,
        help="input channels (default: the model's)",
    )
    parser.add_argument('--xla', action='store_true', help="also print XLA's FLOP count")
    parser.add_argument(
        '--features',
        action='store_true',
        help='one row per feature-pyramid level instead: module, output C/H/W, reduction, '
        'receptive field and jump in input pixels',
    )
    args = parser.parse_args(argv)
    info = jaxcnn.model_info(args.model)
    size = args.input or info.input_size[0]
    channels = args.channels or info.input_size[2]
    if size < info.min_input:
        raise ValueError(
            f'{args.model} needs inputs of at least {info.min_input} px; got --input {size}'
        )
    if args.features:
        if args.xla:
            raise ValueError('--xla counts the classifier; it does not combine with --features')
        levels = feature_levels(args.model, size, channels)
        print(
            f'{args.model} feature levels at {channels}x{size}x{size} '
            '(receptive field and jump in input pixels, per side)'
        )
        print(format_features(levels))
        return 0
    rows = layer_costs(args.model, size, channels)
    model = jaxcnn.create_model(args.model)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)), train=False)
    )
    print(f'{args.model} at {channels}x{size}x{size} (per image)')
    print(format_table(rows, jaxcnn.count_params(shapes['params'])))
    if args.xla:
        macs = sum(r.macs for r in rows)
        flops = xla_flops(args.model, size, channels)
        print(
            f'XLA cost analysis: {flops:,.0f} FLOPs = {flops / (2 * macs):.3f} x 2 x MACs above '
            '(XLA skips taps on zero padding and adds element-wise work)'
        )
    return 0


if __name__ == '__main__':
    from jaxcnn.config import run_cli

    run_cli(main)
