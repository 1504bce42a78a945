"""What every measurement shares: model specs, the trainer's own training step on generated
data, timing, records."""

from __future__ import annotations

import ast
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcnn
from jaxcnn import config as config_lib
from jaxcnn import kernels, optim, sharding, train


def build(spec, num_classes, dtype):
    """``NAME[:plain][:arg=value ...]``: 'plain' turns a reversible model's custom gradient off
    (ordinary autodiff); ``arg=value`` sets any model argument, e.g. ``revnet38:scan_unroll=100``.
    Returns (registered name, model)."""
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


def bench_config(batch: int, size: int, num_classes: int, dtype):
    """The trainer's config for a bench step: SGD with momentum 0.9 at a constant learning
    rate, no weight decay, no augmentation, no EMA (the update every framework's benchmark
    times)."""
    c = config_lib.base_config()
    c.batch_size, c.image_size, c.test_image_size, c.num_classes = batch, size, size, num_classes
    c.bf16 = jnp.dtype(dtype) == jnp.bfloat16
    c.optim.update(dict(name='sgd', lr=0.1, momentum=0.9, nesterov=False, weight_decay=0.0))
    c.schedule.name = 'constant'
    c.augment.update(dict(crop_padding=0, flip=False))
    return c


class Setup:
    """A model and the trainer's training step on generated data (``batch`` images of ``size``
    px, on the first ``devices`` devices: batch split, state replicated).

    step: ``train.make_train_step(...)``, not yet jitted; args: (state, arrays, batch), its
    arguments; jit(): the step jitted as the trainer does (state donated, the policy's XLA
    options)."""

    def __init__(self, spec, batch, size, dtype=jnp.float32, num_classes=1000, devices=1):
        self.spec, self.dtype = spec, dtype
        self.name, self.model = build(spec, num_classes, dtype)
        channels = jaxcnn.model_info(self.name).input_size[2]
        self.mesh = mesh = sharding.make_mesh(devices)
        self.config = config = bench_config(batch, size, num_classes, dtype)
        build_tx = lambda params: optim.build_optimizer(config, params, 100, 1000, batch)[0]
        self.state, self.state_shardings = train.init_state(
            config, self.model, (size, size, channels), mesh, build_tx
        )
        self.tx = build_tx(self.state.params)
        rng = np.random.RandomState(0)
        images = rng.randint(0, 256, (batch, size, size, channels)).astype(np.uint8)
        labels = (np.arange(batch) % num_classes).astype(np.int32)
        self.arrays = sharding.replicate((images, labels), mesh)
        self.batch = sharding.host_to_global({'idx': np.arange(batch, dtype=np.int32)}, mesh)
        self.step = train.make_train_step(
            config, self.model, self.tx, (0.5,) * channels, (0.25,) * channels, size, num_classes
        )
        self.variables = {'params': self.state.params, 'batch_stats': self.state.batch_stats}
        self.image_shape = (size, size, channels)

    @property
    def args(self):
        return self.state, self.arrays, self.batch

    def xla_options(self):
        """The compiler options the trainer would pick for this model (the kernel policy's)."""
        return kernels.model_compiler_options(self.model, self.variables, self.image_shape)

    def jit(self):
        return jax.jit(
            self.step,
            donate_argnums=(0,),
            compiler_options=self.xla_options(),
            out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        )


def time_calls(fn, args, steps, update_args=None):
    """Seconds per call, warm-up excluded, synchronised on the outputs. ``update_args(args,
    out)`` gives the next call's arguments (a donated state moves on)."""
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


def next_state(args, out):
    """The arguments of the next training step: the new state, the same data."""
    return (out[0], *args[1:])


def time_alternating(compiled, args, rounds=4, steps=2, update_args=None):
    """Milliseconds per call of each compiled variant ({key: fn}), timed in alternation for
    ``rounds`` rounds of ``steps`` calls, so that drift in the machine's speed hits all alike.
    ``args`` is one argument tuple for all, or {key: tuple}; with ``update_args`` each variant's
    arguments move on separately (donated states)."""
    current = {k: (args[k] if isinstance(args, dict) else args) for k in compiled}
    times = {key: [] for key in compiled}

    def advance(key):
        def update(a, out):
            current[key] = update_args(a, out)
            return current[key]

        return update if update_args is not None else None

    for _ in range(rounds):
        for key, fn in compiled.items():
            times[key].append(time_calls(fn, current[key], steps, advance(key)) * 1e3)
    return times


def environment():
    dev = jax.devices()[0]
    env = dict(
        device=str(getattr(dev, 'device_kind', dev.platform)),
        platform=dev.platform,
        num_devices=jax.device_count(),
        jax=jax.__version__,
        flax=__import__('flax').__version__,
        optax=optax.__version__,
    )
    if dev.platform == 'cpu':
        env['cpu'] = kernels.cpu.host()
        env['dense_convolutions'] = kernels.describe()
        if kernels.onednn.available():
            env['onednn'] = kernels.onednn.version()
    env['kernel_policy'] = kernels.current().__dict__
    return env


def write(path, record):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(record, f, indent=1)
