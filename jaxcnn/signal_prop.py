"""Signal-propagation plots (Brock et al. 2021a, arXiv:2101.08692, §3): how the residual stream
behaves at initialisation, block by block.

    python -m jaxcnn.signal_prop nfnet_f0                       # writes signal_prop_nfnet_f0.png
    python -m jaxcnn.signal_prop nf_resnet50 resnetv2_50 --size 128 --out spp.png

For every residual block's output x (N, H, W, C) it reports, averaged over channels,
  * the squared channel mean    mean_c (mean_{n,h,w} x)^2
  * the channel variance        mean_c  var_{n,h,w} x
for a batch of N(0, 1) inputs. It works for any registered model: residual blocks are the
model's direct submodules and the unrolled blocks of its stages (:class:`jaxcnn.layers.stage.Stage`)
whose class name ends in ``Block`` or ``Unit`` (``--pattern`` changes this), captured with
Flax's ``capture_intermediates``. BatchNorm models run in training mode
(batch statistics), as at the first step of training; dropout and stochastic depth are off.

Zero-initialised branch gains (NFNet ``skip_gain``, NF-ResNet last-conv ``gain``, zero-init
BatchNorm ``scale``) are set to one first, otherwise every block starts as the identity and
the curves are flat; ``--keep-zero-init`` plots the model exactly as initialised.
"""

import argparse
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import registry
from .config import integer_at_least

BLOCK_PATTERN = r'(Block|Unit)$'
_ZERO_INIT_LEAVES = ('gain', 'skip_gain', 'scale')


def _unzero(params):
    """Set all-zero gain/scale leaves to ones (undo SkipInit-style zero initialisation)."""

    def fix(path, x):
        leaf = getattr(path[-1], 'key', str(path[-1]))
        if leaf in _ZERO_INIT_LEAVES and not np.any(np.asarray(x)):
            return jnp.ones_like(x)
        return x

    return jax.tree_util.tree_map_with_path(fix, params)


def block_statistics(
    name: str,
    size=None,
    batch: int = 8,
    seed: int = 0,
    pattern: str = BLOCK_PATTERN,
    keep_zero_init: bool = False,
):
    """[(block name, avg squared channel mean, avg channel variance)] for model ``name`` at init."""
    info = registry.model_info(name)
    entry_fields = registry._module_fields(registry._lookup(name).module_cls)
    overrides = {
        k: v
        for k, v in dict(drop_rate=0.0, drop_path_rate=0.0, scan_blocks=False).items()
        if k in entry_fields
    }
    model = registry.create_model(name, **overrides)
    h = size or info.input_size[0]
    x = jax.random.normal(jax.random.key(seed + 1), (batch, h, h, info.input_size[2]), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(seed), x, train=False))(x)
    if not keep_zero_init:
        variables = {**variables, 'params': _unzero(variables['params'])}
    regex = re.compile(pattern)

    def is_block(mdl, method):
        path = mdl.scope.path  # a direct submodule, or block b of a stage: (stage, 'b')
        return (
            method == '__call__'
            and regex.search(type(mdl).__name__) is not None
            and (len(path) == 1 or (len(path) == 2 and path[1].isdigit()))
        )

    @jax.jit
    def run(variables, x):
        _, state = model.apply(
            variables,
            x,
            train=True,
            capture_intermediates=is_block,
            mutable=['intermediates', 'batch_stats'],
            rngs={'dropout': jax.random.key(0)},
        )
        stats = {}
        for k, v in traverse_util.flatten_dict(state['intermediates'], sep='/').items():
            if not k.endswith('/__call__'):
                continue
            y = v[0].astype(jnp.float32)
            mean = jnp.mean(y, axis=(0, 1, 2))
            stats[k[: -len('/__call__')]] = (
                jnp.mean(mean**2),
                jnp.mean(jnp.var(y, axis=(0, 1, 2))),
            )
        return stats

    stats = run(variables, x)
    if not stats:
        raise ValueError(f'{name}: no submodule class matches {pattern!r}; pass --pattern')

    def order(k):  # natural order: layer2_10 after layer2_9
        return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', k)]

    return [(k, float(stats[k][0]), float(stats[k][1])) for k in sorted(stats, key=order)]


def plot(results, out: str, title: str = ''):
    """results: {model name: block_statistics(...)}; writes a two-panel PNG."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in results.items():
        idx = np.arange(1, len(rows) + 1)
        axes[0].plot(idx, [r[1] for r in rows], marker='.', label=name)
        axes[1].plot(idx, [r[2] for r in rows], marker='.', label=name)
    for ax, label in zip(axes, ('average squared channel mean', 'average channel variance')):
        ax.set_xlabel('residual block')
        ax.set_ylabel(label)
        ax.set_yscale('log')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or 'Signal propagation at initialisation (N(0,1) inputs)')
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog='python -m jaxcnn.signal_prop', description=__doc__.split('\n')[0]
    )
    p.add_argument('models', nargs='+', help='registered model names')
    p.add_argument(
        '--size', type=integer_at_least(1), default=None, help="input size (default: the model's)"
    )
    p.add_argument('--batch', type=integer_at_least(1), default=8)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--pattern', default=BLOCK_PATTERN, help='regex on block class names')
    p.add_argument('--keep-zero-init', action='store_true', help='do not un-zero branch gains')
    p.add_argument('--out', default=None, help='PNG path (default signal_prop_<models>.png)')
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    results = {}
    for name in a.models:
        rows = block_statistics(name, a.size, a.batch, a.seed, a.pattern, a.keep_zero_init)
        results[name] = rows
        print(f'{name}: {len(rows)} blocks')
        for k, m2, var in rows:
            print(f'  {k:16s} mean^2 {m2:10.4g}  var {var:10.4g}')
    out = a.out or f'signal_prop_{"_".join(a.models)}.png'
    plot(results, out)
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    from jaxcnn.config import run_cli

    run_cli(main)
