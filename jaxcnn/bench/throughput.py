"""Throughput of the training step and of inference, against the PyTorch twin and in parallel."""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxcnn
from jaxcnn import kernels, sharding
from jaxcnn.optim import AUX_LOSS_WEIGHT

from .common import Setup, environment, next_state, split_specs, time_calls, write
from .flops import count_flops, peak_flops


def _report(kind, spec, batch, size, dtype, devices, sec, compile_s, flops):
    dev = jax.devices()[0]
    peak = peak_flops(dev, dtype)
    achieved = flops / sec if sec else 0.0
    return dict(
        kind=kind,
        model=spec,
        batch=batch,
        size=size,
        dtype=jnp.dtype(dtype).name,
        devices=devices,
        ms_per_step=sec * 1e3,
        images_per_sec=batch / sec,
        compile_s=compile_s,
        flops_per_step=flops,
        achieved_flops=achieved,
        mfu=(achieved / (peak * devices)) if peak else None,
    )


def train_rounds(spec, batch, size, dtype=jnp.float32, num_classes=1000, devices=1, steps=10):
    """The trainer's training step (``jaxcnn.train.make_train_step``: the batch gathered from
    device-resident data and normalised, forward, loss, backward, SGD with momentum, metrics;
    the state donated), compiled once; one record per ``next()``, timed anew each round (for
    alternating with another measurement): images/s, ms/step, compile seconds, FLOP/s and MFU."""
    s = Setup(spec, batch, size, dtype, num_classes, devices)
    options = s.xla_options()
    t0 = time.perf_counter()
    compiled = s.jit().lower(*s.args).compile()
    compile_s = time.perf_counter() - t0
    flops = count_flops(s.step, s.args)
    latest = [s.args]

    def update(args, out):
        latest[0] = next_state(args, out)
        return latest[0]

    while True:
        sec = time_calls(compiled, latest[0], steps, update_args=update)
        yield dict(
            _report('train', spec, batch, size, dtype, devices, sec, compile_s, flops),
            xla_options=options,
        )


def infer_rounds(spec, batch, size, dtype=jnp.float32, num_classes=1000, devices=1, steps=10):
    """The forward pass in inference mode, compiled once; one record per ``next()``."""
    s = Setup(spec, batch, size, dtype, num_classes, devices)
    options = s.xla_options()
    images = jax.device_put(
        jnp.asarray(np.random.RandomState(0).randn(batch, *s.image_shape), dtype),
        sharding.batch_sharding(s.mesh),
    )
    forward = lambda v, x: s.model.apply(v, x, train=False)
    t0 = time.perf_counter()
    compiled = jax.jit(forward, compiler_options=options).lower(s.variables, images).compile()
    compile_s = time.perf_counter() - t0
    flops = count_flops(forward, (s.variables, images))
    while True:
        sec = time_calls(compiled, (s.variables, images), steps)
        yield dict(
            _report('infer', spec, batch, size, dtype, devices, sec, compile_s, flops),
            xla_options=options,
        )


def measure_train(*args, **kwargs):
    """Images/s of the trainer's training step: :func:`train_rounds`' first record."""
    return next(train_rounds(*args, **kwargs))


def measure_infer(*args, **kwargs):
    """Images/s of the forward pass in inference mode."""
    return next(infer_rounds(*args, **kwargs))


def measure_latency(spec, sizes=(1, 2, 4, 8, 16, 32, 64), size=224, dtype=jnp.float32, steps=5):
    """Inference milliseconds per image for each batch size."""
    return {b: measure_infer(spec, b, size, dtype, steps=steps)['ms_per_step'] / b for b in sizes}


def torch_reference(spec, batch, size, kind='train', num_classes=1000, steps=10, bf16=False):
    """The same model in PyTorch: see :func:`torch_rounds`."""
    return next(torch_rounds(spec, batch, size, kind, num_classes, steps, bf16))


def torch_rounds(spec, batch, size, kind='train', num_classes=1000, steps=10, bf16=False):
    """The same model in PyTorch (timm/torchvision twin, else timm by name) on this process's
    device: CUDA with bf16 autocast, channels_last and torch.compile when available, else
    eager fp32 on the CPU. Yields the same figures as measure_train / measure_infer, one record
    per ``next()`` (built and warmed up once)."""
    import torch

    name = spec.partition(':')[0]
    torch_name = jaxcnn.model_info(name).torch_name or f'timm:{name}'
    lib, tname = torch_name.split(':')
    if lib == 'tv':
        import torchvision

        net = getattr(torchvision.models, tname)(weights=None, num_classes=num_classes)
    else:
        import timm

        if not timm.is_model(tname):
            raise ValueError(
                f'{name} has no PyTorch twin (neither a torchvision model named in its '
                f'model_info nor a timm model {tname!r}); run it without --vs'
            )
        net = timm.create_model(tname, pretrained=False, num_classes=num_classes)
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    net = net.to(device)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    net = net.to(memory_format=fmt)
    settings = dict(
        device=str(device), autocast_bf16=bool(cuda and bf16), channels_last=cuda, compiled=False
    )
    if cuda and hasattr(torch, 'compile'):
        try:
            net = torch.compile(net)
            settings['compiled'] = True
        except Exception:  # noqa: BLE001 - fall back to eager, and say so in the record
            pass
    channels = jaxcnn.model_info(name).input_size[2]
    x = torch.randn(batch, channels, size, size, device=device).to(memory_format=fmt)
    y = torch.arange(batch, device=device) % num_classes
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    amp = (
        (lambda: torch.autocast('cuda', dtype=torch.bfloat16))
        if settings['autocast_bf16']
        else None
    )

    def step():
        if kind == 'train':
            net.train()
            with amp() if amp else torch.enable_grad():
                out = net(x)
                # torchvision's GoogLeNet and Inception-v3 return their auxiliary heads too;
                # weigh them as the JAX side does
                main, *aux = [o for o in out if o is not None] if isinstance(out, tuple) else [out]
                loss = torch.nn.functional.cross_entropy(main, y)
                for a in aux:
                    loss = loss + AUX_LOSS_WEIGHT * torch.nn.functional.cross_entropy(a, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            net.eval()
            with torch.no_grad(), amp() if amp else torch.no_grad():
                net(x)

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    try:
        step()  # warm-up (and torch.compile's compilation)
    except RuntimeError as e:  # e.g. an input too small for the twin's layers
        raise ValueError(
            f'the PyTorch twin {torch_name} cannot run a {kind} step at {size}x{size}: '
            f'{str(e).splitlines()[0]}; use a larger --size or leave out --vs'
        ) from e
    step()
    sync()
    warm = time.perf_counter() - t0
    while True:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        sec = (time.perf_counter() - t0) / steps
        yield dict(
            kind=kind,
            model=f'torch:{torch_name}',
            batch=batch,
            size=size,
            ms_per_step=sec * 1e3,
            images_per_sec=batch / sec,
            warmup_s=warm,
            torch=torch.__version__,
            **settings,
        )


def line(r):
    parts = [f"{r['model']:>24}"]
    if 'images_per_sec' in r:
        parts.append(f"{r['images_per_sec']:9.1f} img/s  {r['ms_per_step']:8.2f} ms/step")
    if r.get('compile_s') is not None:
        parts.append(f"compile {r['compile_s']:6.1f} s")
    if r.get('achieved_flops'):
        parts.append(f"{r['achieved_flops'] / 1e12:7.2f} TFLOP/s")
    if r.get('mfu') is not None:
        parts.append(f"MFU {r['mfu'] * 100:5.1f}%")
    return '  '.join(parts)


def _best(records):
    """The fastest of repeated measurements, with every round's ms/step kept beside it."""
    best = dict(min(records, key=lambda r: r['ms_per_step']))
    if len(records) > 1:
        best['ms_per_step_rounds'] = [r['ms_per_step'] for r in records]
    return best


def throughput_records(args, spec, ready=None, timing=None):
    """One model's records (ours, then the PyTorch twin's with the ratio) and printed lines.
    With ``ready`` (a barrier) and ``timing`` (a lock), as under ``--parallel``: both sides are
    compiled and warmed up, then wait for the other models' processes to be ready, then are timed
    while holding the lock, so that no compilation or other timing runs beside them."""
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    # On a shared or throttled machine speed drifts between runs: with --rounds N both sides
    # (each compiled and warmed up once) are timed N times in alternation, best of each kept.
    rounds = args.rounds if args.vs else 1
    ours = (train_rounds if args.command == 'train' else infer_rounds)(
        spec, args.batch, args.size, dtype, args.num_classes, args.devices, args.steps
    )
    theirs = (
        torch_rounds(
            spec, args.batch, args.size, args.command, args.num_classes, args.steps, bf16=args.bf16
        )
        if args.vs
        else None
    )
    window = {}
    if ready is not None:
        next(ours)  # compiled and warmed up: this first record is dropped
        if theirs:
            next(theirs)
        window['ready_unix'] = time.time()
        try:
            ready.wait()
        except threading.BrokenBarrierError:  # another model failed: time this one anyway
            pass
    with timing if timing is not None else contextlib.nullcontext():
        start = time.time()
        pairs = [(next(ours), next(theirs) if theirs else None) for _ in range(rounds)]
        if ready is not None:
            window['timed_unix'] = (start, time.time())
    r = dict(_best([p[0] for p in pairs]), **window)
    records, lines = [r], [line(r)]
    if args.vs:
        t = _best([p[1] for p in pairs])
        t['ratio_jaxcnn_over_torch'] = r['images_per_sec'] / t['images_per_sec']
        records.append(t)
        lines += [
            line(t),
            f"{'jaxcnn / ' + args.vs:>24}: {t['ratio_jaxcnn_over_torch']:.2f}x"
            + (f' (best of {rounds} alternating rounds)' if rounds > 1 else ''),
        ]
    return records, lines


def policy(args):
    """The kernel policy a command measures under: the backend's, with ``--xla-options``."""
    choice = getattr(args, 'xla_options', 'trainer')
    return kernels.use(xla_options='auto' if choice == 'trainer' else choice)


def _parallel_worker(args, spec, ready, timing, results):
    try:
        with policy(args):  # a spawned process starts from the default policy
            records, lines = throughput_records(args, spec, ready, timing)
        print('\n'.join(lines), flush=True)
        results.put((spec, records, environment(), None))
    except BaseException as e:  # noqa: BLE001 - reported by the parent, others go on
        ready.abort()
        results.put((spec, [], None, f'{type(e).__name__}: {e}'))


def _run_parallel(args, specs):
    """``--parallel``: each model in its own process, all compiling at once; then timed one at a
    time (a barrier, then a lock). Returns the records in ``specs`` order and the environment."""
    import multiprocessing as mp

    # several processes share the device: each takes memory as it needs it
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    ctx = mp.get_context('spawn')
    ready, timing, results = ctx.Barrier(len(specs)), ctx.Lock(), ctx.Queue()
    procs = [
        ctx.Process(target=_parallel_worker, args=(args, s, ready, timing, results)) for s in specs
    ]
    for p in procs:
        p.start()
    by_spec, env, pending = {}, None, len(specs)
    while pending:
        try:
            spec, records, env_i, error = results.get(timeout=5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):  # a process died without reporting
                ready.abort()
                if results.empty():
                    break
            continue
        pending -= 1
        env = env or env_i
        by_spec[spec] = records
        if error:
            print(f'{spec}: failed: {error}', file=sys.stderr, flush=True)
    for p in procs:
        p.join()
    return [r for s in specs for r in by_spec.get(s, [])], env or {}


def cmd_throughput(args):
    specs = split_specs(args.model)
    if args.parallel and len(specs) > 1:
        results, env = _run_parallel(args, specs)
    else:
        results = []
        for spec in specs:
            records, lines = throughput_records(args, spec)
            results += records
            print('\n'.join(lines), flush=True)
        env = environment()
    write(
        args.out,
        {'command': ' '.join(['python -m jaxcnn.bench'] + sys.argv[1:]), **env, 'results': results},
    )
    return (
        0
        if len({r['model'] for r in results if not r['model'].startswith('torch:')}) == len(specs)
        else 1
    )


def cmd_latency(args):
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    table = {}
    for spec in split_specs(args.models):
        table[spec] = measure_latency(spec, args.batch_sizes, args.size, dtype, args.steps)
        print(
            f'{spec:>24}: '
            + '  '.join(f'b{b} {ms:.2f}' for b, ms in table[spec].items())
            + '  (ms per image)',
            flush=True,
        )
    if args.plot:
        import matplotlib

        matplotlib.use('Agg')
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for spec, lat in table.items():
            ax.plot(list(lat), [1e3 / ms for ms in lat.values()], 'o-', label=spec)
        ax.set(
            xscale='log',
            xlabel='batch size',
            ylabel='images / s',
            title=f'inference throughput, {args.size}px, {jnp.dtype(dtype).name}',
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f'wrote {args.plot}')
    write(
        args.out,
        {
            'command': ' '.join(['python -m jaxcnn.bench'] + sys.argv[1:]),
            **environment(),
            'ms_per_image': table,
        },
    )
    return 0
