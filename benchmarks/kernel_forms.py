"""What each form of the CPU kernel policy earns: training steps with and without it, in one run.

    python benchmarks/kernel_forms.py --out benchmarks/results/kernel_forms_cpu.json

For every case (a shipped recipe's step or a model benchmarked against PyTorch) the trainer's
training step (as the bench runs it, on generated data) is compiled under the library's CPU
policy, under that policy with each form that acts on the model turned off, and under the
plain policy (lax's convolutions as the model states them, with XLA:CPU's own options: its
YNNPACK convolutions, and its oneDNN rewrite, ``xla_cpu_use_onednn``). All are timed in
alternation, so that the machine's drift hits every variant alike; the best round of each is
kept, and the median beside it. A form stays in the policy only where it gains at least 10 % on
some case (BENCHMARKS.md, "Kernel forms on the CPU"). ``--only NAME[,NAME]`` runs the cases whose
model spec starts with a NAME; ``--rounds``/``--steps`` set the timing; ``--no-plain`` leaves out the
plain policy, whose grouped depthwise convolutions take seconds per step on XLA:CPU.
"""

import argparse
import dataclasses
import sys
import time

import jax
import numpy as np

from jaxcnn import bench, kernels

# (model spec, batch, size, the policy fields to turn off one at a time)
CASES = [
    (
        'resnet20:layers=(2,2,2)',
        128,
        28,
        ('onednn', 'block_boundary', 'xla_options'),
    ),  # default recipe
    ('resnet18', 32, 112, ('onednn', 'block_boundary', 'xla_options')),  # against PyTorch
    ('resnet18', 32, 64, ('onednn', 'small_map_products')),  # maps of 2x2
    ('resnet50', 16, 112, ('onednn', 'block_boundary')),
    ('revnet38', 32, 32, ('onednn', 'loop_gradients')),  # revnet38_cifar
    ('mobilenetv2_100', 32, 112, ('depthwise_taps', 'onednn')),  # against timm
    ('convnext_tiny', 16, 112, ('depthwise_taps', 'onednn')),  # against timm
    ('nfnet_f0', 8, 64, ('loop_gradients', 'xla_options')),  # nfnet_f0, grouped
]
# A field's "off": False, except the XLA options, whose alternative is XLA's defaults (YNNPACK's
# convolutions wherever oneDNN's do not run)
OFF = {'xla_options': 'defaults'}
# XLA:CPU's own oneDNN rewrite of convolutions and matrix products
XLA_ONEDNN = {'xla_cpu_use_onednn': True}


def variants(off, with_plain=True):
    """(label, policy, XLA options added to the policy's) for one case: the CPU policy, it with
    each form in ``off`` turned off, XLA's own routes in place of the oneDNN handlers (its
    oneDNN rewrite; its default YNNPACK convolutions), and the plain policy (lax as the model
    states it) with XLA's defaults and with its oneDNN rewrite."""
    cpu = kernels.CPU
    out = [('cpu policy', cpu, {})]
    out += [
        (f'without {field}', dataclasses.replace(cpu, **{field: OFF.get(field, False)}), {})
        for field in off
    ]
    if 'onednn' in off:
        out += [
            (
                'without onednn, xla_cpu_use_onednn',
                dataclasses.replace(cpu, onednn=False),
                XLA_ONEDNN,
            ),
            (
                'without onednn, XLA defaults',
                dataclasses.replace(cpu, onednn=False, xla_options='defaults'),
                {},
            ),
        ]
    if with_plain:
        plain = dataclasses.replace(kernels.PLAIN, xla_options='defaults')
        out += [
            ('plain, XLA defaults', plain, {}),
            ('plain, xla_cpu_use_onednn', plain, XLA_ONEDNN),
        ]
    return out


def compile_step(spec, batch, size, policy, extra_options):
    """The trainer's training step for ``spec`` (the bench's setup) traced under ``policy``, with
    the policy's XLA options and ``extra_options``. Returns (compiled step, or None where this
    XLA does not take the options; its arguments; the options)."""
    with kernels.use(policy):
        s = bench.Setup(spec, batch, size)
        options = {**s.xla_options(), **extra_options}
        if options and not kernels.cpu.accepted(tuple(sorted(options.items()))):
            return None, s.args, options
        step = jax.jit(s.step, donate_argnums=(0,), compiler_options=options)
        return step.lower(*s.args).compile(), s.args, options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--steps', type=int, default=2)
    parser.add_argument('--only', default='')
    parser.add_argument(
        '--no-plain',
        action='store_true',
        help='leave out the plain policy (minutes per step for depthwise networks)',
    )
    parser.add_argument('--out', default='')
    args = parser.parse_args(argv)
    results = []
    for spec, batch, size, off in CASES:
        if args.only and not spec.startswith(tuple(args.only.split(','))):
            continue
        compiled, step_args, options, compile_s = {}, {}, {}, {}
        for label, policy, extra in variants(off, not args.no_plain):
            t0 = time.perf_counter()
            step, step_args[label], options[label] = compile_step(spec, batch, size, policy, extra)
            compile_s[label] = time.perf_counter() - t0
            if step is None:
                print(f'{spec}: {label}: this XLA does not take {options[label]}', flush=True)
                continue
            compiled[label] = step
        times = bench.time_alternating(
            compiled,
            step_args,
            rounds=args.rounds,
            steps=args.steps,
            update_args=bench.common.next_state,
        )
        best = {label: min(t) for label, t in times.items()}
        median = {label: float(np.median(t)) for label, t in times.items()}
        base = best['cpu policy']
        print(
            f'{spec} b{batch} {size}px: '
            + ', '.join(f'{label} {ms:.1f} ms ({ms / base:.2f}x)' for label, ms in best.items()),
            flush=True,
        )
        results.append(
            dict(
                model=spec,
                batch=batch,
                size=size,
                ms_per_step=best,
                median_ms=median,
                all_ms=times,
                slowdown_over_cpu_policy={k: v / base for k, v in best.items()},
                xla_options=options,
                compile_s=compile_s,
            )
        )
        command = (
            'python benchmarks/kernel_forms.py'
            + ''.join(
                f' --{k} {v}'
                for k, v in (
                    ('rounds', args.rounds),
                    ('steps', args.steps),
                    ('only', args.only),
                    ('out', args.out),
                )
                if v
            )
            + (' --no-plain' if args.no_plain else '')
        )
        bench.write(args.out, {'command': command, **bench.environment(), 'results': results})
    return 0


if __name__ == '__main__':
    sys.exit(main())
