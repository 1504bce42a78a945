"""The README's model table: `python -m jaxcnn.model_table [pattern]` prints it as Markdown."""

import argparse

import jax
import jax.numpy as jnp

from .registry import count_params, create_model, list_models, model_info


def model_params(name: str) -> int:
    """Parameter count of a registered model at its default input and classes (no compile)."""
    info = model_info(name)
    h, w, c = info.input_size
    model = create_model(name)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c)), train=False)
    )
    return count_params(shapes['params'])


def _reference_figure(info) -> str:
    if info.params_rounding is None:
        return f'{int(info.reference_params):,}'
    return f'{info.reference_params / 1e6:g}M'


def model_gmacs(name: str) -> float:
    """Multiply-adds of one image at the model's default input, in billions (jaxcnn.summary)."""
    from .summary import layer_costs

    h, _, c = model_info(name).input_size
    return sum(r.macs for r in layer_costs(name, h, c)) / 1e9


def markdown_table(pattern: str = '*') -> str:
    rows = [
        '| model | input | reference | reference params | jaxcnn params | GMACs | logits vs PyTorch |',
        '|---|---|---|---:|---:|---:|---|',
    ]
    for name in list_models(pattern):
        info = model_info(name)
        h, w, _ = info.input_size
        twin = f'`{info.torch_name}`' if info.torch_name else '—'
        rows.append(
            f'| `{name}` | {h}×{w} | {info.reference} | {_reference_figure(info)} | '
            f'{model_params(name):,} | {model_gmacs(name):.3g} | {twin} |'
        )
    return '\n'.join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m jaxcnn.model_table', description=__doc__)
    parser.add_argument(
        'pattern',
        nargs='?',
        default='*',
        help='a wildcard over model names, e.g. "resnet*" (default: every model)',
    )
    args = parser.parse_args(argv)
    if not list_models(args.pattern):
        raise ValueError(f'no registered model matches {args.pattern!r}; see jaxcnn.list_models()')
    print(markdown_table(args.pattern))
    return 0


if __name__ == '__main__':
    from .config import run_cli

    run_cli(main)
