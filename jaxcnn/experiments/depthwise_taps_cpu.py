"""CPU training steps with depthwise convolutions as fused per-tap sums and as XLA's grouped
convolutions, timed in alternation.

    python -m jaxcnn.experiments.depthwise_taps_cpu --out benchmarks/results/depthwise_taps_cpu.json

For each model (name, batch, resolution) both steps are compiled (the switch
``layers.conv.CPU_DEPTHWISE_TAPS`` is read while tracing; each variant gets the XLA options the
trainer would pick for it), then timed in alternation, 3 rounds of 2 steps; the minimum per
variant is reported. The bench's SGD step.
"""
import argparse

from jaxcnn import bench

CASES = (('mobilenetv2_100', 32, 112), ('efficientnet_b0', 32, 112), ('convnext_tiny', 16, 112),
         ('mobilenetv3_large_100', 32, 112))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    results = []
    for spec, batch, size in CASES:
        options, times = bench.time_switch(spec, batch, size, 'CPU_DEPTHWISE_TAPS', rounds=3)
        taps, grouped = min(times[True]), min(times[False])
        print(f'{spec:>22} b{batch} {size}px: {taps:8.1f} ms with per-tap sums, {grouped:8.1f} ms '
              f'with grouped convolutions ({grouped / taps:.2f}x)', flush=True)
        results.append({'model': spec, 'batch': batch, 'size': size,
                        'xla_options': {'taps': options[True], 'grouped': options[False]},
                        'ms_per_step': {'taps': taps, 'grouped': grouped},
                        'all_ms': {'taps': times[True], 'grouped': times[False]}})
    command = 'python -m jaxcnn.experiments.depthwise_taps_cpu' + (f' --out {args.out}' if args.out else '')
    bench._write(args.out, {'command': command, **bench._environment(), 'results': results})


if __name__ == '__main__':
    main()
