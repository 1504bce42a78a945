"""CPU training steps with and without ``layers.residual_output``'s boundary, timed in alternation.

    python -m jaxcnn.experiments.residual_boundary_cpu --out benchmarks/results/residual_boundary_cpu.json

For each model (name, batch, resolution) both steps are compiled (the switch
``layers.conv.CPU_MATERIALIZE_RESIDUALS`` is read while tracing), then timed in alternation,
4 rounds of 2 steps; the minimum per variant is reported. The bench's SGD step and the trainer's
XLA options.
"""
import argparse

from jaxcnn import bench

CASES = (('resnet18', 32, 112), ('resnet18:stem=cifar', 128, 28), ('resnet50', 16, 112),
         ('resnet152', 16, 112), ('convnext_tiny', 16, 112))


def compare(spec, batch, size, rounds=4):
    options, times = bench.time_switch(spec, batch, size, 'CPU_MATERIALIZE_RESIDUALS', rounds)
    return {'model': spec, 'batch': batch, 'size': size, 'xla_options': options[True],
            'ms_per_step': {'boundary': min(times[True]), 'no boundary': min(times[False])},
            'all_ms': {'boundary': times[True], 'no boundary': times[False]}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    results = []
    for spec, batch, size in CASES:
        r = compare(spec, batch, size)
        ms = r['ms_per_step']
        print(f"{spec:>22} b{batch} {size}px: {ms['boundary']:8.1f} ms with the boundary, "
              f"{ms['no boundary']:8.1f} ms without ({ms['no boundary'] / ms['boundary']:.2f}x)")
        results.append(r)
    command = 'python -m jaxcnn.experiments.residual_boundary_cpu' + (f' --out {args.out}' if args.out else '')
    bench._write(args.out, {'command': command, **bench._environment(), 'results': results})


if __name__ == '__main__':
    main()
