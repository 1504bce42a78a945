"""Every convolution of a model's training step, timed alone: jaxcnn's kernels against PyTorch's.

    python benchmarks/conv_kernels_cpu.py --model resnet18 --batch 32 --size 112 \
        --out benchmarks/results/conv_kernels_resnet18_cpu.json

The convolutions are read from the model's forward pass (its jaxpr), so the shapes are the
model's own. Each distinct one is timed three ways, as the training step runs it: forward, input
gradient (skipped for the convolution that reads the images, whose gradient no step needs) and
kernel gradient; on XLA with the trainer's compiler options and in the form the CPU kernel
policy gives it (oneDNN's kernels; with ``--xla-convolutions`` XLA's own), on PyTorch with
``aten.convolution_backward`` (eager, fp32, the CPU kernels torchvision users get). The totals,
weighted by how often each convolution occurs, bound how close a whole XLA step can come to
PyTorch's: the rest of the step (BatchNorm, ReLU, residual sums, update) is what is left to win on.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import bench, kernels


def conv_equations(jaxpr, inputs):
    """(params, lhs shape, rhs shape, reads_inputs) of every convolution in ``jaxpr`` and the
    jaxprs nested in it; ``reads_inputs`` says the convolution's operand is one of ``inputs``."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'conv_general_dilated':
            lhs, rhs = eqn.invars[:2]
            found.append(
                (eqn.params, lhs.aval.shape, rhs.aval.shape, any(lhs is v for v in inputs))
            )
        for sub in kernels.sub_jaxprs(eqn.params.values()):
            found.extend(conv_equations(sub, ()))
    return found


def _key(params, lhs, rhs):
    dn = params['dimension_numbers']
    return (
        lhs,
        rhs,
        tuple(params['window_strides']),
        tuple(map(tuple, params['padding'])),
        tuple(params['lhs_dilation']),
        tuple(params['rhs_dilation']),
        (dn.lhs_spec, dn.rhs_spec, dn.out_spec),
        params['feature_group_count'],
    )


def _best_ms(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def time_xla(params, lhs_shape, rhs_shape, options, repeats=5):
    """Milliseconds of the forward, input-gradient and kernel-gradient convolution, in the form
    the current kernel policy gives it (oneDNN's convolution where it applies)."""

    def conv(x, w):
        return kernels.conv_general_dilated(
            x,
            w,
            params['window_strides'],
            params['padding'],
            params['lhs_dilation'],
            params['rhs_dilation'],
            params['dimension_numbers'],
            params['feature_group_count'],
        )

    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(*lhs_shape), jnp.float32)
    w = jnp.asarray(rng.randn(*rhs_shape) * 0.05, jnp.float32)
    g = jnp.asarray(rng.randn(*conv(x, w).shape), jnp.float32)
    fwd = jax.jit(conv, compiler_options=options)
    dx = jax.jit(
        lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0], compiler_options=options
    )
    dw = jax.jit(
        lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0], compiler_options=options
    )
    return (
        _best_ms(fwd, (x, w), repeats),
        _best_ms(dx, (x, w, g), repeats),
        _best_ms(dw, (x, w, g), repeats),
    )


def time_torch(params, lhs_shape, rhs_shape, repeats=5):
    """The same three convolutions in PyTorch (NCHW, OIHW), eager fp32."""
    import torch

    dn = params['dimension_numbers']
    n, c, *spatial = (lhs_shape[i] for i in dn.lhs_spec)
    o, i, *kernel = (rhs_shape[k] for k in dn.rhs_spec)
    pads = [tuple(p) for p in params['padding']]
    x = torch.randn(n, c, *spatial)
    if any(lo != hi for lo, hi in pads):  # PyTorch pads symmetrically: pad the input instead
        x = torch.nn.functional.pad(x, [v for lo_hi in reversed(pads) for v in lo_hi])
        pads = [(0, 0)] * len(pads)
    w = torch.randn(o, i, *kernel) * 0.05
    stride, padding = list(params['window_strides']), [lo for lo, _ in pads]
    dilation, groups = list(params['rhs_dilation']), params['feature_group_count']
    y = torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)
    g = torch.randn_like(y)

    def backward(mask):
        return lambda: torch.ops.aten.convolution_backward(
            g, x, w, None, stride, padding, dilation, False, [0, 0], groups, mask
        )

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    with torch.no_grad():
        return (
            best(lambda: torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)),
            best(backward([True, False, False])),
            best(backward([False, True, False])),
        )


def run(
    spec,
    batch,
    size,
    repeats=5,
    grouped_depthwise=False,
    xla_small_maps=False,
    xla_convolutions=False,
):
    setup = bench.Setup(spec, batch, size)
    model, variables = setup.model, setup.variables
    images = jnp.asarray(np.random.RandomState(0).randn(batch, *setup.image_shape), jnp.float32)
    with kernels.use(
        kernels.CPU, depthwise_taps=not grouped_depthwise, small_map_products=not xla_small_maps
    ):
        options = setup.xla_options()
        convolutions = model_convolutions(model, variables, images)
        with kernels.use(onednn=not xla_convolutions):
            result = _time_all(spec, batch, size, repeats, options, convolutions)
    return dict(
        result,
        grouped_depthwise=grouped_depthwise,
        xla_small_maps=xla_small_maps,
        xla_convolutions=xla_convolutions,
        onednn=not xla_convolutions and kernels.onednn.available(),
    )


def model_convolutions(model, variables, images):
    """:func:`conv_equations` of the model's training forward pass on ``images``, traced with
    oneDNN off, so that the convolutions it runs are listed as convolutions."""
    with kernels.use(onednn=False):
        closed = jax.make_jaxpr(
            lambda x: model.apply(
                variables,
                x,
                train=True,
                mutable=['batch_stats'],
                rngs={'dropout': jax.random.key(0)},
            )
        )(images)
    return conv_equations(closed.jaxpr, closed.jaxpr.invars)


def _time_all(spec, batch, size, repeats, options, convolutions):
    counts, first = {}, {}
    for params, lhs, rhs, reads_inputs in convolutions:
        key = _key(params, lhs, rhs)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, (params, lhs, rhs, reads_inputs))
    rows, totals = [], {'xla': [0.0, 0.0, 0.0], 'torch': [0.0, 0.0, 0.0]}
    for key, (params, lhs, rhs, reads_inputs) in first.items():
        xla, torch_ms = (
            time_xla(params, lhs, rhs, options, repeats),
            time_torch(params, lhs, rhs, repeats),
        )
        dn = params['dimension_numbers']
        row = dict(
            input=[lhs[i] for i in dn.lhs_spec],
            kernel=[rhs[i] for i in dn.rhs_spec],
            stride=list(params['window_strides']),
            groups=params['feature_group_count'],
            count=counts[key],
            input_gradient=not reads_inputs,
            xla_ms=dict(zip(('forward', 'input_gradient', 'kernel_gradient'), xla)),
            torch_ms=dict(zip(('forward', 'input_gradient', 'kernel_gradient'), torch_ms)),
        )
        if reads_inputs:
            row['xla_ms'].pop('input_gradient')
            row['torch_ms'].pop('input_gradient')
        for lib in ('xla', 'torch'):
            for i, part in enumerate(('forward', 'input_gradient', 'kernel_gradient')):
                totals[lib][i] += row[f'{lib}_ms'].get(part, 0.0) * counts[key]
        rows.append(row)
        print(
            f"N,C,H,W {row['input']} O,I,kh,kw {row['kernel']} stride {row['stride']} x{counts[key]}: "
            + '  '.join(
                f"{lib} " + '/'.join(f'{v:.1f}' for v in row[f'{lib}_ms'].values())
                for lib in ('xla', 'torch')
            )
            + ' ms',
            flush=True,
        )
    summary = {
        lib: dict(zip(('forward', 'input_gradient', 'kernel_gradient'), t), total=sum(t))
        for lib, t in totals.items()
    }
    return dict(
        model=spec, batch=batch, size=size, xla_options=options, convolutions=rows, total_ms=summary
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--size', type=int, default=112)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument(
        '--grouped-depthwise',
        action='store_true',
        help="keep depthwise convolutions as XLA's grouped convolutions (on the CPU "
        'they are per-tap sums, not convolutions, and are otherwise not listed)',
    )
    parser.add_argument(
        '--xla-small-maps',
        action='store_true',
        help="keep dense convolutions on maps smaller than their kernel as XLA's "
        'convolutions (on the CPU they are matrix products and are otherwise '
        'not listed)',
    )
    parser.add_argument(
        '--xla-convolutions',
        action='store_true',
        help="time dense convolutions with XLA's own (Eigen's) kernels rather than oneDNN's",
    )
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    import torch

    result = run(
        args.model,
        args.batch,
        args.size,
        args.repeats,
        args.grouped_depthwise,
        args.xla_small_maps,
        args.xla_convolutions,
    )
    for lib, t in result['total_ms'].items():
        print(
            f"{lib:>6}: forward {t['forward']:.1f} ms, input gradients {t['input_gradient']:.1f} ms, "
            f"kernel gradients {t['kernel_gradient']:.1f} ms, all convolutions {t['total']:.1f} ms"
        )
    command = (
        f'python benchmarks/conv_kernels_cpu.py --model {args.model} --batch {args.batch} '
        f'--size {args.size}'
        + (' --grouped-depthwise' if args.grouped_depthwise else '')
        + (' --xla-small-maps' if args.xla_small_maps else '')
        + (' --xla-convolutions' if args.xla_convolutions else '')
        + (f' --out {args.out}' if args.out else '')
    )
    bench.write(
        args.out,
        {
            'command': command,
            **bench.environment(),
            'torch': torch.__version__,
            'torch_threads': torch.get_num_threads(),
            **result,
        },
    )


if __name__ == '__main__':
    main()
