"""Peak memory of one compiled training step, and seconds to compile one."""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

import jaxcnn

from .common import Setup, environment, next_state, split_specs, time_calls, write


def allocator_peak_bytes(device) -> int | None:
    """The device allocator's high-water mark (GPU, TPU), or None where the backend keeps no
    allocator statistics (the CPU). It covers the whole process: measure one model per run."""
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
    return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def measure_memory(spec, batch, size, num_classes=10, dtype=jnp.float32, time_steps=0):
    """Compiles the trainer's training step (state donated) and reads
    ``compiled.memory_analysis()``. Returns a dict of byte counts (and seconds per step).
    On a device with allocator statistics it also runs the step and records the allocator's
    peak (``allocator_peak_bytes``, process-wide: one model per run for per-model figures)."""
    s = Setup(spec, batch, size, dtype, num_classes)
    t0 = time.time()
    compiled = s.jit().lower(*s.args).compile()
    compile_s = time.time() - t0
    m = compiled.memory_analysis()
    out = dict(
        model=spec,
        params=jaxcnn.count_params(s.state.params),
        batch=batch,
        size=size,
        dtype=jnp.dtype(dtype).name,
        platform=jax.devices()[0].platform,
        temp_bytes=int(m.temp_size_in_bytes),
        argument_bytes=int(m.argument_size_in_bytes),
        output_bytes=int(m.output_size_in_bytes),
        alias_bytes=int(m.alias_size_in_bytes),
        generated_code_bytes=int(m.generated_code_size_in_bytes),
        compile_s=compile_s,
    )
    # donated state aliases its outputs: count those bytes once
    out['peak_bytes'] = (
        out['temp_bytes'] + out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
    )
    device = jax.devices()[0]
    args = s.args
    if time_steps or allocator_peak_bytes(device) is not None:
        args = next_state(args, jax.block_until_ready(compiled(*args)))  # warm-up
        if allocator_peak_bytes(device) is not None:
            out['allocator_peak_bytes'] = allocator_peak_bytes(device)
    if time_steps:
        out['sec_per_step'] = time_calls(compiled, args, time_steps, update_args=next_state)
    return out


def measure_compile(spec, batch, size, dtype=jnp.float32, num_classes=1000):
    """Seconds to trace, lower and compile the trainer's training step."""
    s = Setup(spec, batch, size, dtype, num_classes)
    t0 = time.perf_counter()
    s.jit().lower(*s.args).compile()
    return dict(
        kind='compile',
        model=spec,
        batch=batch,
        size=size,
        dtype=jnp.dtype(dtype).name,
        compile_s=time.perf_counter() - t0,
    )


def cmd_memory(args):
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    results = []
    for spec in split_specs(args.models):
        r = measure_memory(spec, args.batch, args.size, args.num_classes, dtype, args.time_steps)
        results.append(r)
        t = f', {r["sec_per_step"] * 1e3:.0f} ms/step' if 'sec_per_step' in r else ''
        if 'allocator_peak_bytes' in r:
            t += f', allocator peak {r["allocator_peak_bytes"] / 2**20:.1f} MiB'
        print(
            f'{spec:>22}: params {r["params"]:>10,}  peak {r["peak_bytes"] / 2**20:8.1f} MiB '
            f'(temp {r["temp_bytes"] / 2**20:8.1f} MiB){t}',
            flush=True,
        )
    write(
        args.out,
        {
            'command': ' '.join(['python -m jaxcnn.bench'] + sys.argv[1:]),
            **environment(),
            'results': results,
        },
    )
    return 0


def cmd_compile(args):
    from .throughput import line

    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    results = [
        measure_compile(s, args.batch, args.size, dtype, args.num_classes)
        for s in split_specs(args.model)
    ]
    for r in results:
        print(line(r), flush=True)
    write(
        args.out,
        {
            'command': ' '.join(['python -m jaxcnn.bench'] + sys.argv[1:]),
            **environment(),
            'results': results,
        },
    )
    return 0
