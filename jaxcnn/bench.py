"""Benchmarks: `python -m jaxcnn.bench SUBCOMMAND ...` (one subparser per measurement).

train    images/s and ms/step of the full training step (forward, loss, backward, SGD update,
         state donated), warm-up excluded, device synchronised; compile time; FLOP/s achieved
         (XLA cost analysis) and its fraction of the device's peak (MFU); `--vs timm` runs the
         same model in PyTorch on the same device in the same process (on a GPU: bf16 autocast,
         channels_last, torch.compile; on a CPU: eager fp32, as torchvision users run it);
         `--rounds N` measures both N times in alternation and compares the best of each;
         `--parallel` builds several models in one process each, all at once, then times them
         one at a time:
           python -m jaxcnn.bench train --model resnet50 --batch 256 --size 224 --bf16 --vs timm
infer    the same for the forward pass in inference mode
compile  seconds to compile one training step (e.g. ResNet-152 against ResNet-50)
flops    FLOPs of one training step, counted without running it (for MFU of runs elsewhere)
latency  inference time per image for batch sizes 1, 2, 4, ..., 64 and a throughput plot:
           python -m jaxcnn.bench latency --models resnet18,resnet50 --plot latency.png
memory   peak memory of one compiled training step, from XLA's own memory analysis, and the
         time per step; e.g. reversible vs ordinary backprop:
           python -m jaxcnn.bench memory --models revnet38,revnet38:plain,resnet32 --batch 128

A model spec is NAME[:plain][:arg=value ...]; ':plain' sets ``reversible=False`` (ordinary
autodiff) on a reversible model, ':arg=value' any model argument (e.g. ``:scan_unroll=100``). `--out FILE.json` writes a record (device, versions, settings, figures).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import queue
import sys
import threading
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax

import jaxcnn
from jaxcnn import sharding
from jaxcnn.config import integer_at_least, integers_at_least
from jaxcnn.layers import compiler_options, model_compiler_options
from jaxcnn.layers import conv as conv_layers
from jaxcnn.layers import onednn
from jaxcnn.optim import AUX_LOSS_WEIGHT, classification_loss, split_outputs


def _build(spec, num_classes, dtype):
    """``NAME[:plain][:arg=value ...]``: 'plain' turns a reversible model's custom VJP off (ordinary
    autodiff); ``arg=value`` sets any model argument, e.g. ``revnet38:scan_unroll=100``."""
    name, *variants = spec.split(':')
    overrides = {}
    for v in variants:
        if v == 'plain':
            overrides['reversible'] = False
        elif '=' in v:
            key, value = v.split('=', 1)
            try:
                overrides[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                overrides[key] = value
        else:
            raise ValueError(f"model spec {spec!r}: {v!r} is neither 'plain' nor arg=value")
    if dtype != jnp.float32:
        overrides['dtype'] = dtype
    return name, jaxcnn.create_model(name, num_classes=num_classes, **overrides)


def split_specs(text):
    """Comma-separated model specs; commas inside brackets belong to a value, so
    ``revnet164:layers=(2,2,2),revnet164`` is two specs."""
    specs, depth, current = [], 0, ''
    for ch in text:
        depth += (ch in '([{') - (ch in ')]}')
        if ch == ',' and depth == 0:
            specs.append(current)
            current = ''
        else:
            current += ch
    return [s for s in specs + [current] if s]


# `--xla-options`: 'trainer' (jaxcnn.layers.compiler_options for the model, as the trainer
# compiles), 'defaults' (XLA's own) or 'dense' (the options for models without depthwise
# convolutions, whatever the model)
XLA_OPTIONS = 'trainer'


def _xla_options(model, variables, images):
    """The XLA compiler options the bench compiles this model's steps with."""
    if XLA_OPTIONS == 'defaults':
        return {}
    if XLA_OPTIONS == 'dense':
        return compiler_options()
    return model_compiler_options(model, variables, images.shape[1:], images.dtype)


def _train_step(model, tx):
    """The trainer's update (jaxcnn.train) reduced to its parts: loss, grads, SGD, new stats."""
    def step(params, batch_stats, opt_state, images, labels, key):
        def loss_fn(p):
            outputs, state = model.apply({'params': p, 'batch_stats': batch_stats}, images,
                                         train=True, rngs={'dropout': key}, mutable=['batch_stats'])
            # the trainer's loss: auxiliary heads (GoogLeNet, Inception-v3) weigh 0.3 each
            logits = split_outputs(outputs)[0]
            targets = labels
            if logits.ndim > 2:     # dense prediction (U-Net): each pixel has its image's label
                targets = jnp.broadcast_to(labels.reshape(-1, *[1] * (logits.ndim - 2)),
                                           logits.shape[:-1])
            return (classification_loss(outputs, targets, logits.shape[-1]),
                    state['batch_stats'])
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss
    return step


def allocator_peak_bytes(device) -> int | None:
    """The device allocator's high-water mark (GPU, TPU), or None where the backend keeps no
    allocator statistics (the CPU). It covers the whole process: measure one model per run."""
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
    return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def measure_memory(spec, batch, size, num_classes=10, dtype=jnp.float32, time_steps=0):
    """Compiles one training step (state donated, as the trainer does) and reads
    ``compiled.memory_analysis()``. Returns a dict of byte counts (and seconds per step).
    On a device with allocator statistics it also runs the step and records the allocator's
    peak (``allocator_peak_bytes``, process-wide: one model per run for per-model figures)."""
    name, model = _build(spec, num_classes, dtype)
    x = jnp.zeros((batch, size, size, 3), jnp.float32)
    variables = jax.jit(lambda: model.init({'params': jax.random.key(0)}, x[:1], train=False))()
    params, stats = variables['params'], variables.get('batch_stats', {})
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)
    images = jnp.asarray(np.random.RandomState(0).randn(batch, size, size, 3), dtype)
    labels = jnp.asarray(np.arange(batch) % num_classes, jnp.int32)
    step = jax.jit(_train_step(model, tx), donate_argnums=(0, 1, 2),
                   compiler_options=_xla_options(model, variables, images))
    t0 = time.time()
    compiled = step.lower(params, stats, opt_state, images, labels, jax.random.key(1)).compile()
    compile_s = time.time() - t0
    m = compiled.memory_analysis()
    out = dict(model=spec, params=jaxcnn.count_params(params), batch=batch, size=size,
               dtype=jnp.dtype(dtype).name, platform=jax.devices()[0].platform,
               temp_bytes=int(m.temp_size_in_bytes), argument_bytes=int(m.argument_size_in_bytes),
               output_bytes=int(m.output_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes),
               generated_code_bytes=int(m.generated_code_size_in_bytes), compile_s=compile_s)
    # donated state aliases its outputs: count those bytes once
    out['peak_bytes'] = out['temp_bytes'] + out['argument_bytes'] + out['output_bytes'] - out['alias_bytes']
    device = jax.devices()[0]
    if time_steps or allocator_peak_bytes(device) is not None:
        state = (params, stats, opt_state)
        key = jax.random.key(1)
        state = compiled(*state, images, labels, key)[:3]            # warm-up
        jax.block_until_ready(state)
        if allocator_peak_bytes(device) is not None:
            out['allocator_peak_bytes'] = allocator_peak_bytes(device)
    if time_steps:
        t0 = time.time()
        for _ in range(time_steps):
            *state, loss = compiled(*state, images, labels, key)
        jax.block_until_ready(loss)
        out['sec_per_step'] = (time.time() - t0) / time_steps
    return out


# Dense peak FLOP/s per device by compute dtype (vendor data sheets; fp32 on NVIDIA GPUs is
# TF32 tensor-core math, XLA's default for fp32 matmuls and convolutions there).
PEAK_FLOPS = {
    'H100': {'bfloat16': 989e12, 'float32': 494e12},
    'H200': {'bfloat16': 989e12, 'float32': 494e12},
    'A100': {'bfloat16': 312e12, 'float32': 156e12},
    'V100': {'bfloat16': 125e12, 'float32': 15.7e12},
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},
    'TPU v5p': {'bfloat16': 459e12, 'float32': 459e12},
}


def peak_flops(device, dtype) -> float | None:
    """The device's dense peak for ``dtype``, or None when unknown (e.g. a CPU)."""
    kind = getattr(device, 'device_kind', '')
    for key, peaks in PEAK_FLOPS.items():
        if key.lower() in kind.lower():
            return peaks[jnp.dtype(dtype).name if jnp.dtype(dtype).name in peaks else 'float32']
    return None


def _flops(fn, args) -> float:
    """FLOPs of one call of ``fn(*args)`` (the model FLOPs of MFU: the plain lax program, whatever
    forms :mod:`jaxcnn.layers.conv` picks for the CPU) from XLA's cost analysis of the program
    lowered for the CPU, before optimisation, with every loop body counted as often as it runs. (The same
    analysis on a GPU counts nothing for convolutions, which become cuDNN calls, so the count is
    taken on the host whatever the device; and it counts a loop body once, so scanned blocks'
    further runs are added from the jaxpr's scan lengths.)"""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args)
    # the model's own operations, not the CPU's forms
    with conv_layers.switches(CPU_GRADIENT_FORMS=False):
        return _xla_flops(fn, shapes) + _uncounted_loop_flops(jax.make_jaxpr(fn)(*shapes).jaxpr, cpu)


def _xla_flops(fn, shapes) -> float:
    cost = jax.jit(fn).lower(*shapes).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', 0.0)) if cost else 0.0


def _uncounted_loop_flops(jaxpr, sharding) -> float:
    """What the cost analysis of ``jaxpr``'s program leaves out: each scan body's runs after the
    first, and on every run whatever the body's own loops leave out."""
    missing = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'scan':
            body, length = eqn.params['jaxpr'], eqn.params['length']
            shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in body.in_avals]
            once = _xla_flops(jax.extend.core.jaxpr_as_fun(body), shapes)
            missing += (length - 1) * once + length * _uncounted_loop_flops(body.jaxpr, sharding)
        else:
            missing += sum(_uncounted_loop_flops(sub, sharding)
                           for sub in conv_layers._sub_jaxprs(eqn.params.values()))
    return missing


def _setup(spec, batch, size, dtype, num_classes, devices):
    """Model, variables, optimiser and one batch, sharded over the first ``devices`` devices
    (data parallel: batch split, parameters replicated)."""
    name, model = _build(spec, num_classes, dtype)
    info = jaxcnn.model_info(name)
    channels = info.input_size[2]
    mesh = sharding.make_mesh(devices)          # the trainer's mesh
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA_AXIS))
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    variables = jax.jit(lambda: model.init({'params': jax.random.key(0)}, x, train=False),
                        out_shardings=rep)()
    images = jax.device_put(np.random.RandomState(0).randn(batch, size, size, channels).astype(
        jnp.dtype(dtype)), split)
    labels = jax.device_put(np.arange(batch, dtype=np.int32) % num_classes, split)
    return name, model, variables, images, labels, rep


def _time(fn, args, steps, update_args=None):
    """Seconds per call, warm-up excluded, synchronised on the outputs."""
    out = fn(*args)
    jax.block_until_ready(out)
    if update_args is not None:
        args = update_args(args, out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn(*args)
        if update_args is not None:
            args = update_args(args, out)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def _report(kind, spec, batch, size, dtype, devices, sec, compile_s, flops):
    dev = jax.devices()[0]
    peak = peak_flops(dev, dtype)
    achieved = flops / sec if sec else 0.0
    return dict(kind=kind, model=spec, batch=batch, size=size, dtype=jnp.dtype(dtype).name,
                devices=devices, ms_per_step=sec * 1e3, images_per_sec=batch / sec,
                compile_s=compile_s, flops_per_step=flops, achieved_flops=achieved,
                mfu=(achieved / (peak * devices)) if peak else None)


def measure_train(*args, **kwargs):
    """Images/s of the full training step (SGD with momentum), as the trainer runs it."""
    return next(train_rounds(*args, **kwargs))


def measure_infer(*args, **kwargs):
    """Images/s of the forward pass in inference mode."""
    return next(infer_rounds(*args, **kwargs))


def train_rounds(spec, batch, size, dtype=jnp.float32, num_classes=1000, devices=1, steps=10):
    """:func:`measure_train`'s figures, one record per ``next()``: compiled once, timed anew each
    round (for alternating with another measurement)."""
    name, model, variables, images, labels, rep = _setup(spec, batch, size, dtype, num_classes, devices)
    params, stats = variables['params'], variables.get('batch_stats', {})
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = jax.jit(tx.init, out_shardings=rep)(params)
    options = _xla_options(model, variables, images)
    step = jax.jit(_train_step(model, tx), donate_argnums=(0, 1, 2), compiler_options=options)
    key = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = step.lower(params, stats, opt_state, images, labels, key).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(_train_step(model, tx), (params, stats, opt_state, images, labels, key))
    latest = [(params, stats, opt_state, images, labels, key)]   # the donated state moves on

    def update(args, out):
        latest[0] = (*out[:3], *args[3:])
        return latest[0]
    while True:
        sec = _time(compiled, latest[0], steps, update_args=update)
        yield dict(_report('train', spec, batch, size, dtype, devices, sec, compile_s,
                           flops), xla_options=options)


def infer_rounds(spec, batch, size, dtype=jnp.float32, num_classes=1000, devices=1, steps=10):
    """:func:`measure_infer`'s figures, one record per ``next()`` (compiled once)."""
    name, model, variables, images, labels, rep = _setup(spec, batch, size, dtype, num_classes, devices)
    options = _xla_options(model, variables, images)
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=options)
    t0 = time.perf_counter()
    compiled = fwd.lower(variables, images).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(lambda v, x: model.apply(v, x, train=False), (variables, images))
    while True:
        sec = _time(compiled, (variables, images), steps)
        yield dict(_report('infer', spec, batch, size, dtype, devices, sec, compile_s, flops),
                   xla_options=options)


def measure_compile(spec, batch, size, dtype=jnp.float32, num_classes=1000):
    """Seconds to trace, lower and compile one training step."""
    name, model = _build(spec, num_classes, dtype)
    channels = jaxcnn.model_info(name).input_size[2]
    x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.dtype(dtype))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)), train=False))
    tx = optax.sgd(0.1, momentum=0.9)
    opt_shapes = jax.eval_shape(tx.init, shapes['params'])
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step = jax.jit(_train_step(model, tx), donate_argnums=(0, 1, 2),
                   compiler_options=_xla_options(model, shapes, x))
    t0 = time.perf_counter()
    step.lower(shapes['params'], shapes.get('batch_stats', {}), opt_shapes, x, labels,
               jax.random.key(1)).compile()
    return dict(kind='compile', model=spec, batch=batch, size=size, dtype=jnp.dtype(dtype).name,
                compile_s=time.perf_counter() - t0)


def torch_reference(spec, batch, size, kind='train', num_classes=1000, steps=10, bf16=False):
    """The same model in PyTorch (timm/torchvision twin, else timm by name) on this process's
    device: see :func:`torch_rounds`."""
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
            raise ValueError(f'{name} has no PyTorch twin (neither a torchvision model named in its '
                             f'model_info nor a timm model {tname!r}); run it without --vs')
        net = timm.create_model(tname, pretrained=False, num_classes=num_classes)
    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    net = net.to(device)
    fmt = torch.channels_last if cuda else torch.contiguous_format
    net = net.to(memory_format=fmt)
    settings = dict(device=str(device), autocast_bf16=bool(cuda and bf16), channels_last=cuda,
                    compiled=False)
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
    amp = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if settings['autocast_bf16'] else None

    def step():
        if kind == 'train':
            net.train()
            with (amp() if amp else torch.enable_grad()):
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
            with torch.no_grad(), (amp() if amp else torch.no_grad()):
                net(x)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    try:
        step()                      # warm-up (and torch.compile's compilation)
    except RuntimeError as e:       # e.g. an input too small for the twin's layers
        raise ValueError(f'the PyTorch twin {torch_name} cannot run a {kind} step at {size}x{size}: '
                         f'{str(e).splitlines()[0]}; use a larger --size or leave out --vs') from e
    step(); sync()
    warm = time.perf_counter() - t0
    while True:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        sec = (time.perf_counter() - t0) / steps
        yield dict(kind=kind, model=f'torch:{torch_name}', batch=batch, size=size,
                   ms_per_step=sec * 1e3, images_per_sec=batch / sec, warmup_s=warm,
                   torch=torch.__version__, **settings)


def measure_latency(spec, sizes=(1, 2, 4, 8, 16, 32, 64), size=224, dtype=jnp.float32, steps=5):
    """Inference milliseconds per image for each batch size."""
    out = {}
    for b in sizes:
        r = measure_infer(spec, b, size, dtype, steps=steps)
        out[b] = r['ms_per_step'] / b
    return out


def _environment():
    dev = jax.devices()[0]
    env = dict(device=str(getattr(dev, 'device_kind', dev.platform)), platform=dev.platform,
               num_devices=jax.device_count(), jax=jax.__version__,
               flax=__import__('flax').__version__, optax=optax.__version__)
    if dev.platform == 'cpu':
        env['dense_convolutions'] = onednn.log_line()
        if onednn.available():
            env['onednn'] = onednn.version()
    return env


def time_alternating(compiled, args, rounds=4, steps=2):
    """Milliseconds per call of each compiled variant ({key: fn}), timed in alternation for
    ``rounds`` rounds of ``steps`` calls, so that drift in the machine's speed hits all alike."""
    times = {key: [] for key in compiled}
    for _ in range(rounds):
        for key, fn in compiled.items():
            times[key].append(_time(fn, args, steps) * 1e3)
    return times


def time_switch(spec, batch, size, switch, rounds=4, steps=2, dtype=jnp.float32):
    """The bench's training step (SGD, the trainer's XLA options) compiled with a boolean switch of
    ``jaxcnn.layers.conv`` (read while tracing, e.g. ``CPU_DEPTHWISE_TAPS``) on and off, timed in
    alternation. Returns {True: XLA options, False: ...} and {True: [ms, ...], False: [...]}."""
    _, model, variables, images, labels, _ = _setup(spec, batch, size, dtype, 1000, 1)
    params, stats = variables['params'], variables.get('batch_stats', {})
    tx = optax.sgd(0.1, momentum=0.9)
    step_args = (params, stats, tx.init(params), images, labels, jax.random.key(1))
    compiled, options = {}, {}
    for on in (True, False):
        with conv_layers.switches(**{switch: on}):
            options[on] = _xla_options(model, variables, images)   # as the trainer would pick them
            compiled[on] = jax.jit(_train_step(model, tx), compiler_options=options[on]).lower(
                *step_args).compile()
    return options, time_alternating(compiled, step_args, rounds=rounds, steps=steps)


def switch_experiment(module, doc, switch, cases, labels, rounds=3, steps=2, dtype=jnp.float32):
    """The command line of an A/B experiment (``python -m MODULE [--out FILE]``, described by its
    docstring ``doc``): for each
    (model, batch, size) in ``cases``, :func:`time_switch` on ``switch``; prints the best time of
    each variant (``labels``: what on and off mean) and writes the JSON record."""
    parser = argparse.ArgumentParser(description=' '.join(doc.split('\n\n')[0].split()))
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    on, off = labels
    results = []
    for spec, batch, size in cases:
        options, times = time_switch(spec, batch, size, switch, rounds, steps, dtype)
        best_on, best_off = min(times[True]), min(times[False])
        print(f'{spec:>22} b{batch} {size}px: {best_on:8.1f} ms with {on}, {best_off:8.1f} ms with {off} '
              f'({best_off / best_on:.2f}x)', flush=True)
        results.append({'model': spec, 'batch': batch, 'size': size, 'dtype': jnp.dtype(dtype).name,
                        'xla_options': {on: options[True], off: options[False]},
                        'ms_per_step': {on: best_on, off: best_off},
                        'all_ms': {on: times[True], off: times[False]}})
        command = f'python -m {module}' + (f' --out {args.out}' if args.out else '')
        _write(args.out, {'command': command, 'switch': switch, **_environment(),   # per case: a
                          'results': results})                                   # cut-off run keeps it


def _write(path, record):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(record, f, indent=1)


def _line(r):
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


def _throughput_records(args, spec, ready=None, timing=None):
    """One model's records (ours, then the PyTorch twin's with the ratio) and printed lines.
    With ``ready`` (a barrier) and ``timing`` (a lock), as under ``--parallel``: both sides are
    compiled and warmed up, then wait for the other models' processes to be ready, then are timed
    while holding the lock, so that no compilation or other timing runs beside them."""
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    # On a shared or throttled machine speed drifts between runs: with --rounds N both sides
    # (each compiled and warmed up once) are timed N times in alternation, best of each kept.
    rounds = args.rounds if args.vs else 1
    ours = (train_rounds if args.command == 'train' else infer_rounds)(
        spec, args.batch, args.size, dtype, args.num_classes, args.devices, args.steps)
    theirs = torch_rounds(spec, args.batch, args.size, args.command, args.num_classes,
                          args.steps, bf16=args.bf16) if args.vs else None
    window = {}
    if ready is not None:
        next(ours)                      # compiled and warmed up: this first record is dropped
        if theirs:
            next(theirs)
        window['ready_unix'] = time.time()
        try:
            ready.wait()
        except threading.BrokenBarrierError:   # another model failed: time this one anyway
            pass
    with timing if timing is not None else contextlib.nullcontext():
        start = time.time()
        pairs = [(next(ours), next(theirs) if theirs else None) for _ in range(rounds)]
        if ready is not None:
            window['timed_unix'] = (start, time.time())
    r = dict(_best([p[0] for p in pairs]), **window)
    records, lines = [r], [_line(r)]
    if args.vs:
        t = _best([p[1] for p in pairs])
        t['ratio_jaxcnn_over_torch'] = r['images_per_sec'] / t['images_per_sec']
        records.append(t)
        lines += [_line(t), f"{'jaxcnn / ' + args.vs:>24}: {t['ratio_jaxcnn_over_torch']:.2f}x"
                  + (f' (best of {rounds} alternating rounds)' if rounds > 1 else '')]
    return records, lines


def _parallel_worker(args, spec, ready, timing, results):
    try:
        records, lines = _throughput_records(args, spec, ready, timing)
        print('\n'.join(lines), flush=True)
        results.put((spec, records, _environment(), None))
    except BaseException as e:          # noqa: BLE001 - reported by the parent, others go on
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
    procs = [ctx.Process(target=_parallel_worker, args=(args, s, ready, timing, results))
             for s in specs]
    for p in procs:
        p.start()
    by_spec, env, pending = {}, None, len(specs)
    while pending:
        try:
            spec, records, env_i, error = results.get(timeout=5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):   # a process died without reporting
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
    global XLA_OPTIONS
    XLA_OPTIONS = args.xla_options
    specs = split_specs(args.model)
    if args.parallel and len(specs) > 1:
        results, env = _run_parallel(args, specs)
    else:
        results = []
        for spec in specs:
            records, lines = _throughput_records(args, spec)
            results += records
            print('\n'.join(lines), flush=True)
        env = _environment()
    _write(args.out, {'command': ' '.join(['python -m jaxcnn.bench'] + sys.argv[1:]),
                      **env, 'results': results})
    return 0 if len({r['model'] for r in results if not r['model'].startswith('torch:')}) == len(specs) else 1


def cmd_flops(args):
    """FLOPs of one training step (and per image) from :func:`_flops`, without running it."""
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    results = []
    for spec in split_specs(args.model):
        _, model, variables, images, labels, _ = _setup(spec, args.batch, args.size, dtype,
                                                        args.num_classes, 1)
        params, stats = variables['params'], variables.get('batch_stats', {})
        tx = optax.sgd(0.1, momentum=0.9)
        flops = _flops(_train_step(model, tx), (params, stats, tx.init(params), images, labels,
                                                jax.random.key(1)))
        results.append(dict(kind='flops', model=spec, batch=args.batch, size=args.size,
                            dtype=jnp.dtype(dtype).name, flops_per_step=flops,
                            flops_per_image=flops / args.batch))
        print(f'{spec:>24}  {flops / 1e9:12.1f} GFLOP per training step  '
              f'{flops / args.batch / 1e9:8.2f} GFLOP per image', flush=True)
    _write(args.out, {'command': ' '.join(['python -m jaxcnn.bench'] + sys.argv[1:]),
                      **_environment(), 'results': results})
    return 0


def cmd_compile(args):
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    results = [measure_compile(s, args.batch, args.size, dtype, args.num_classes)
               for s in split_specs(args.model)]
    for r in results:
        print(_line(r), flush=True)
    _write(args.out, {'command': ' '.join(['python -m jaxcnn.bench'] + sys.argv[1:]),
                      **_environment(), 'results': results})
    return 0


def cmd_latency(args):
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    sizes = args.batch_sizes
    table = {}
    for spec in split_specs(args.models):
        table[spec] = measure_latency(spec, sizes, args.size, dtype, args.steps)
        print(f'{spec:>24}: ' + '  '.join(f'b{b} {ms:.2f}' for b, ms in table[spec].items())
              + '  (ms per image)', flush=True)
    if args.plot:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for spec, lat in table.items():
            ax.plot(list(lat), [1e3 / ms for ms in lat.values()], 'o-', label=spec)
        ax.set(xscale='log', xlabel='batch size', ylabel='images / s',
               title=f'inference throughput, {args.size}px, {jnp.dtype(dtype).name}')
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f'wrote {args.plot}')
    _write(args.out, {'command': ' '.join(['python -m jaxcnn.bench'] + sys.argv[1:]),
                      **_environment(), 'ms_per_image': table})
    return 0


def cmd_memory(args):
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    results = []
    for spec in split_specs(args.models):
        r = measure_memory(spec, args.batch, args.size, args.num_classes, dtype, args.time_steps)
        results.append(r)
        t = f', {r["sec_per_step"] * 1e3:.0f} ms/step' if 'sec_per_step' in r else ''
        if 'allocator_peak_bytes' in r:
            t += f', allocator peak {r["allocator_peak_bytes"] / 2**20:.1f} MiB'
        print(f'{spec:>22}: params {r["params"]:>10,}  peak {r["peak_bytes"] / 2**20:8.1f} MiB '
              f'(temp {r["temp_bytes"] / 2**20:8.1f} MiB){t}', flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump({'command': ' '.join(['python -m jaxcnn.bench'] + sys.argv[1:]),
                       'jax': jax.__version__, 'device': str(jax.devices()[0]),
                       'results': results}, f, indent=1)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m jaxcnn.bench', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    positive = integer_at_least(1)
    mem = sub.add_parser('memory', help='peak memory (XLA memory analysis) of one training step')
    mem.add_argument('--models', required=True, help='comma-separated NAME[:plain][:arg=value] specs')
    mem.add_argument('--batch', type=positive, default=128)
    mem.add_argument('--size', type=positive, default=32, help='square input size')
    mem.add_argument('--num-classes', type=positive, default=10)
    mem.add_argument('--bf16', action='store_true', help='bf16 compute (fp32 parameters)')
    mem.add_argument('--time-steps', type=integer_at_least(0), default=0, help='also time this many steps')
    mem.add_argument('--out', default='', help='write the results as JSON here')
    mem.set_defaults(func=cmd_memory)

    for kind, helptext in [('train', 'throughput of the full training step'),
                           ('infer', 'throughput of inference')]:
        p = sub.add_parser(kind, help=helptext)
        p.add_argument('--model', required=True, help='NAME[:plain][:arg=value], or several comma-separated')
        p.add_argument('--batch', type=positive, default=64)
        p.add_argument('--size', type=positive, default=224)
        p.add_argument('--num-classes', type=positive, default=1000)
        p.add_argument('--bf16', action='store_true', help='bf16 compute (fp32 parameters)')
        p.add_argument('--devices', type=positive, default=1, help='data-parallel over this many devices')
        p.add_argument('--steps', type=positive, default=10, help='timed steps after warm-up')
        p.add_argument('--vs', choices=['timm'], default=None, help='also run the PyTorch twin')
        p.add_argument('--rounds', type=positive, default=1,
                       help='with --vs: measure both this many times in alternation and compare '
                            'the best of each (for machines whose speed drifts)')
        p.add_argument('--xla-options', choices=['trainer', 'defaults', 'dense'], default='trainer',
                       help="XLA compiler options: the trainer's for the model (default), XLA's "
                            "defaults, or those for models without depthwise convolutions")
        p.add_argument('--parallel', action='store_true',
                       help='several models: compile them in one process each, all at once, then '
                            'time them one at a time (saves wall time on a many-core host)')
        p.add_argument('--out', default='')
        p.set_defaults(func=cmd_throughput)
    for kind, helptext, func in [
            ('compile', 'compile time of one training step', cmd_compile),
            ('flops', "FLOPs of one training step (XLA's count, loops counted once per run), "
                      'without running it', cmd_flops)]:
        p = sub.add_parser(kind, help=helptext)
        p.add_argument('--model', required=True)
        p.add_argument('--batch', type=positive, default=64)
        p.add_argument('--size', type=positive, default=224)
        p.add_argument('--num-classes', type=positive, default=1000)
        p.add_argument('--bf16', action='store_true')
        p.add_argument('--out', default='')
        p.set_defaults(func=func)
    p = sub.add_parser('latency', help='inference ms per image over batch sizes')
    p.add_argument('--models', required=True)
    p.add_argument('--batch-sizes', type=integers_at_least(1), default='1,2,4,8,16,32,64')
    p.add_argument('--size', type=positive, default=224)
    p.add_argument('--bf16', action='store_true')
    p.add_argument('--steps', type=positive, default=5)
    p.add_argument('--plot', default='', help='write a throughput-vs-batch PNG here')
    p.add_argument('--out', default='')
    p.set_defaults(func=cmd_latency)
    args = parser.parse_args(argv)
    for spec in split_specs(getattr(args, 'model', None) or getattr(args, 'models', '')):
        jaxcnn.model_info(spec.partition(':')[0])      # unknown name: one clear line
    return args.func(args)


if __name__ == '__main__':
    from jaxcnn.config import run_cli
    run_cli(main)
