"""Why one global batch's gradients differ between 1 and 4 devices in float32, with evidence.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/data_parallel_gradients.py \
        --out benchmarks/results/data_parallel_gradients_cpu.json

For each model (the default recipe's ResNet-20 and RevNet-38, as tests/test_sharding.py runs
them: batch 8 at 16x16, training mode, BatchNorm over the global batch), the largest relative
difference of any gradient leaf, ||a - b|| / ||b||, between:

* ``f32 1 vs 4 devices``: the same batch on one device and split over four;
* ``f32 1 device, input +1 ulp``: one device both times, the input moved by one unit in the last
  place (``np.nextafter``), a change as small as a different summation order;
* ``f64 1 vs 4 devices``: the first comparison in float64.

If splitting the batch changed what is computed (statistics per device, a missing all-reduce),
float64 would keep the difference. If it is rounding meeting a kink (a ReLU input that sums to
either side of zero in the two orders), float32 shows it under any ulp-sized change, float64
does not, and the worst leaves are those whose gradient sums over few elements.
"""

import argparse
import json
import sys

import jax
import numpy as np


def gradients(name, dtype, devices, x, labels):
    import jax.numpy as jnp
    import jaxcnn
    from jaxcnn import sharding

    model = jaxcnn.create_model(
        name,
        dtype=dtype,
        param_dtype=dtype,
        **({'layers': [2, 2, 2]} if name == 'resnet20' else {}),
    )
    variables = jax.jit(
        lambda: model.init(jax.random.key(0), jnp.asarray(x[:1], dtype), train=False)
    )()

    def loss(params, x):
        logits, _ = model.apply(
            {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
        )
        logp = jax.nn.log_softmax(logits.astype(dtype))
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))

    mesh = sharding.make_mesh(devices)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA_AXIS))
    step = jax.jit(jax.grad(loss), in_shardings=(rep, split), out_shardings=rep)
    grads = jax.device_get(step(variables['params'], jax.device_put(jnp.asarray(x, dtype), split)))
    return model, variables, grads


def worst_leaf(a, b):
    paths = jax.tree_util.tree_flatten_with_path(b)[0]
    diffs = [
        (
            float(
                np.linalg.norm(np.asarray(u, np.float64) - np.asarray(v, np.float64))
                / max(np.linalg.norm(np.asarray(v, np.float64)), 1e-300)
            ),
            jax.tree_util.keystr(p),
            int(np.size(v)),
        )
        for (p, v), u in zip(paths, jax.tree.leaves(a))
    ]
    rel, path, size = max(diffs)
    return dict(relative_difference=rel, leaf=path, leaf_size=size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', default='resnet20,revnet38')
    parser.add_argument('--out', default='')
    args = parser.parse_args(argv)
    if jax.device_count() < 4:
        raise SystemExit(
            'needs 4 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=4'
        )
    jax.config.update('jax_enable_x64', True)
    x = np.random.RandomState(0).randn(8, 16, 16, 3).astype(np.float32)
    labels = np.arange(8) % 10
    results = []
    for name in args.models.split(','):
        _, _, one = gradients(name, np.float32, 1, x, labels)
        _, _, four = gradients(name, np.float32, 4, x, labels)
        _, _, nudged = gradients(name, np.float32, 1, np.nextafter(x, np.float32(np.inf)), labels)
        _, _, one64 = gradients(name, np.float64, 1, x.astype(np.float64), labels)
        _, _, four64 = gradients(name, np.float64, 4, x.astype(np.float64), labels)
        r = {
            'model': name,
            'f32 1 vs 4 devices': worst_leaf(four, one),
            'f32 1 device, input +1 ulp': worst_leaf(nudged, one),
            'f64 1 vs 4 devices': worst_leaf(four64, one64),
        }
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(
                {
                    'command': 'XLA_FLAGS=--xla_force_host_platform_device_count=4 python '
                    'benchmarks/data_parallel_gradients.py'
                    + (f' --models {args.models}' if args.models != 'resnet20,revnet38' else '')
                    + f' --out {args.out}',
                    'jax': jax.__version__,
                    'results': results,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == '__main__':
    sys.exit(main())
