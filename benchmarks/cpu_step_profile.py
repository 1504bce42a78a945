"""Where a CPU training step spends its time, by kind of XLA operation, from a profiler trace.

    python benchmarks/cpu_step_profile.py --model resnet18 --out benchmarks/results/resnet18_step_profile_cpu.json

Compiles the trainer's training step (as the bench runs it: SGD, the trainer's XLA options), runs it under
``jax.profiler`` for a few steps and sums the trace's events per operation name, with the
numeric suffix dropped (``transpose_copy_fusion.29`` counts as ``transpose_copy_fusion``).
XLA:CPU's convolutions run on Eigen's thread pool and their trace events cover only the
dispatch, so the convolutions' own time is the step time less what is listed.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

from jaxcnn import bench, kernels

# trace events that are not XLA operations: Python frames, the executor's waits, jit dispatch
_NOT_OPS = re.compile(r'^\$|Execute|PjitFunction|block_until_ready|^end: ')


def op_times(trace_file: str, steps: int) -> collections.Counter:
    with gzip.open(trace_file) as f:
        trace = json.load(f)
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    per_kind = collections.Counter()
    for event in events:
        if event.get('ph') == 'X' and not _NOT_OPS.search(event['name']):
            per_kind[re.sub(r'\.\d+$', '', event['name'])] += event.get('dur', 0) / 1e3 / steps
    return per_kind


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--size', type=int, default=112)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--devices', type=int, default=1)
    parser.add_argument(
        '--no-residual-boundary',
        action='store_true',
        help="trace without the kernel policy's block boundary (A/B timing)",
    )
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    with kernels.use(block_boundary=not args.no_residual_boundary):
        setup = bench.Setup(args.model, args.batch, args.size, devices=args.devices)
        options = setup.xla_options()
        step = jax.jit(setup.step, compiler_options=options).lower(*setup.args).compile()
        step_args = setup.args
    ms_per_step = bench.time_calls(step, step_args, args.steps) * 1e3
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(args.steps):
            jax.block_until_ready(step(*step_args))
        jax.profiler.stop_trace()
        (trace_file,) = glob.glob(
            os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True
        )
        per_kind = op_times(trace_file, args.steps)
    listed = sum(per_kind.values())
    command = (
        'python benchmarks/cpu_step_profile.py'
        f' --model {args.model} --batch {args.batch} --size {args.size}'
        + (f' --devices {args.devices}' if args.devices != 1 else '')
        + (' --no-residual-boundary' if args.no_residual_boundary else '')
        + (f' --out {args.out}' if args.out else '')
    )
    record = {
        'command': command,
        **bench.environment(),
        'xla_options': options,
        'model': args.model,
        'batch': args.batch,
        'size': args.size,
        'devices': args.devices,
        'residual_boundary': not args.no_residual_boundary,
        'ms_per_step': ms_per_step,
        'ms_listed_operations': listed,
        'ms_per_operation_kind': dict(per_kind.most_common()),
    }
    print(f'{args.model}: {ms_per_step:.1f} ms per step; listed operations {listed:.1f} ms')
    for kind, ms in per_kind.most_common(12):
        print(f'{ms:9.1f} ms  {kind}')
    bench.write(args.out, record)


if __name__ == '__main__':
    main()
