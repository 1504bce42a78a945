"""ResNet-18's CPU training step with jaxcnn's max-pool gradient form and with nn.max_pool's.

    python -m jaxcnn.experiments.maxpool_form_cpu --out benchmarks/results/maxpool_form_cpu.json

Batch 32, 112 px, the bench's SGD step and the trainer's XLA options; the two compiled steps are
timed in alternation (4 rounds of 3 steps), and the minimum per variant is reported.
"""
import argparse

import jax
import jax.numpy as jnp
import optax

from jaxcnn import bench
from jaxcnn.layers import conv as conv_layers


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    _, model, variables, images, labels, _ = bench._setup('resnet18', 32, 112, jnp.float32, 1000, 1)
    params, stats = variables['params'], variables.get('batch_stats', {})
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)
    options = bench._xla_options(model, variables, images)
    step_args = (params, stats, opt_state, images, labels, jax.random.key(1))
    compiled = {}
    for form in (True, False):          # the flag is read while tracing
        conv_layers.CPU_GRADIENT_FORMS = form
        compiled[form] = jax.jit(bench._train_step(model, tx), compiler_options=options).lower(
            *step_args).compile()
    conv_layers.CPU_GRADIENT_FORMS = True
    times = bench.time_alternating(compiled, step_args, rounds=4, steps=3)
    command = 'python -m jaxcnn.experiments.maxpool_form_cpu' + (f' --out {args.out}' if args.out else '')
    record = {'command': command,
              **bench._environment(), 'xla_options': options,
              'ms_per_step': {'jaxcnn max_pool form': min(times[True]),
                              'nn.max_pool (XLA reduce_window gradient)': min(times[False])},
              'all_ms': {'form': times[True], 'nn.max_pool': times[False]}}
    for k, v in record['ms_per_step'].items():
        print(f'{k:>42}: {v:7.1f} ms per step')
    bench._write(args.out, record)


if __name__ == '__main__':
    main()
