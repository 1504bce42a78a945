"""Benchmarks: `python -m jaxcnn.bench SUBCOMMAND ...` (one subparser per measurement).

memory   peak memory of one compiled training step, from XLA's own memory analysis, and the
         time per step; e.g. reversible vs ordinary backprop:
           python -m jaxcnn.bench memory --models revnet38,revnet38:plain,resnet32 --batch 128

A model spec is NAME[:plain]; ':plain' sets ``reversible=False`` (ordinary autodiff) on a
reversible model. New subcommands (train / infer throughput) add a subparser and a function.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcnn


def _build(spec, num_classes, dtype):
    name, _, variant = spec.partition(':')
    overrides = {'reversible': False} if variant == 'plain' else {}
    if dtype != jnp.float32:
        overrides['dtype'] = dtype
    return name, jaxcnn.create_model(name, num_classes=num_classes, **overrides)


def _train_step(model, tx):
    """The trainer's update (jaxcnn.train) reduced to its parts: loss, grads, SGD, new stats."""
    def step(params, batch_stats, opt_state, images, labels, key):
        def loss_fn(p):
            logits, state = model.apply({'params': p, 'batch_stats': batch_stats}, images,
                                        train=True, rngs={'dropout': key}, mutable=['batch_stats'])
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)), state['batch_stats']
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss
    return step


def measure_memory(spec, batch, size, num_classes=10, dtype=jnp.float32, time_steps=0):
    """Compiles one training step (state donated, as the trainer does) and reads
    ``compiled.memory_analysis()``. Returns a dict of byte counts (and seconds per step)."""
    name, model = _build(spec, num_classes, dtype)
    x = jnp.zeros((batch, size, size, 3), jnp.float32)
    variables = jax.jit(lambda: model.init({'params': jax.random.key(0)}, x[:1], train=False))()
    params, stats = variables['params'], variables.get('batch_stats', {})
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)
    images = jnp.asarray(np.random.RandomState(0).randn(batch, size, size, 3), dtype)
    labels = jnp.asarray(np.arange(batch) % num_classes, jnp.int32)
    step = jax.jit(_train_step(model, tx), donate_argnums=(0, 1, 2))
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
    if time_steps:
        state = (params, stats, opt_state)
        key = jax.random.key(1)
        state = compiled(*state, images, labels, key)[:3]            # warm-up
        jax.block_until_ready(state)
        t0 = time.time()
        for _ in range(time_steps):
            *state, loss = compiled(*state, images, labels, key)
        jax.block_until_ready(loss)
        out['sec_per_step'] = (time.time() - t0) / time_steps
    return out


def cmd_memory(args):
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    results = []
    for spec in [s for s in args.models.split(',') if s]:
        r = measure_memory(spec, args.batch, args.size, args.num_classes, dtype, args.time_steps)
        results.append(r)
        t = f', {r["sec_per_step"] * 1e3:.0f} ms/step' if 'sec_per_step' in r else ''
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
    mem = sub.add_parser('memory', help='peak memory (XLA memory analysis) of one training step')
    mem.add_argument('--models', required=True, help='comma-separated NAME[:plain] specs')
    mem.add_argument('--batch', type=int, default=128)
    mem.add_argument('--size', type=int, default=32, help='square input size')
    mem.add_argument('--num-classes', type=int, default=10)
    mem.add_argument('--bf16', action='store_true', help='bf16 compute (fp32 parameters)')
    mem.add_argument('--time-steps', type=int, default=0, help='also time this many steps')
    mem.add_argument('--out', default='', help='write the results as JSON here')
    mem.set_defaults(func=cmd_memory)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
