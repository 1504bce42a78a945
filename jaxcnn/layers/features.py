"""Feature pyramids: the maps a backbone offers at its stage outputs, for dense prediction.

A model marks each level once, in its own ``__call__``, with ``tap(x, name)``; ``name`` is timm's
module name for that level where the model has a timm twin (``'layer1'``, ``'stages.0'``,
``'blocks.2'``), so ``feature_info`` reads like timm's. Outside a pyramid a tap returns its input
and records nothing, so a classifier computes exactly what it did. ``FeaturePyramid`` collects
the taps of one forward pass; it shares the backbone's variables, names and all, so a
classifier's weights (less its head) load into it unchanged.

Taps collect through a ContextVar at trace time. Flax offers ``sow`` for this, but sown values
come back only as a mutable collection that every caller would have to ask for; a pyramid should
return its maps as an ordinary output. A tap therefore sits in a model's top-level code, never
inside an ``nn.scan`` or ``nn.remat`` body, whose values belong to an inner trace.
"""

import contextlib
import contextvars
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_TAPS = contextvars.ContextVar('jaxcnn_feature_taps', default=None)


def tap(x, name: str):
    """Offer ``x`` as the feature level ``name``; returns ``x``."""
    taps = _TAPS.get()
    if taps is not None:
        taps.append((name, x))
    return x


@contextlib.contextmanager
def _collecting():
    taps = []
    token = _TAPS.set(taps)
    try:
        yield taps
    finally:
        _TAPS.reset(token)


def tapped(backbone: nn.Module, x, train: bool = False):
    """``[(name, map), ...]`` of every level ``backbone`` taps while it runs on ``x`` (call it
    inside a bound module, or from ``FeaturePyramid``)."""
    with _collecting() as taps:
        backbone(x, train=train, features_only=True)
    names = [n for n, _ in taps]
    if not taps:
        raise ValueError(f'{type(backbone).__name__} taps no feature levels')
    if len(set(names)) != len(names):
        raise ValueError(f'{type(backbone).__name__} taps a level twice: {names}')
    return taps


def select_levels(n_levels: int, out_indices: Optional[Sequence[int]]):
    """The level indices ``out_indices`` names (all of them when None; negative ones count from
    the last level, as in timm)."""
    if out_indices is None:
        return list(range(n_levels))
    chosen = []
    for i in out_indices:
        if not isinstance(i, int) or not -n_levels <= i < n_levels:
            raise ValueError(
                f'out_indices {tuple(out_indices)} name a level outside the {n_levels} this '
                f'model has (0..{n_levels - 1}, or negative from the end)'
            )
        chosen.append(i % n_levels)
    return chosen


class FeaturePyramid(nn.Module):
    """The list of feature maps a backbone taps, at ``out_indices`` (all levels by default),
    finest first. Its variables are the backbone's own (built with ``num_classes=0``)."""

    backbone: nn.Module
    out_indices: Optional[Sequence[int]] = None

    def setup(self):
        # the backbone's variables sit at the top level, as in the classifier it came from
        nn.share_scope(self, self.backbone)

    def __call__(self, x, train: bool = False):
        taps = tapped(self.backbone, x, train)
        return [taps[i][1] for i in select_levels(len(taps), self.out_indices)]


def feature_info(backbone: nn.Module, input_shape, out_indices=None):
    """timm's ``feature_info.get_dicts()`` for ``backbone`` on one ``input_shape`` (H, W, C)
    image: ``module``, ``num_chs`` and ``reduction`` of each level, found by tracing shapes only
    (nothing is computed). ``reduction`` is the input's side over the level's, rounded to a power
    of two, since padded strides leave odd sides (75 px -> 38 -> 19 ...)."""
    names = []

    def levels(x):
        variables = backbone.init(jax.random.key(0), x)
        taps = nn.apply(lambda module, x: tapped(module, x), backbone, mutable=False)(variables, x)
        names.extend(n for n, _ in taps)
        return [m for _, m in taps]

    shapes = jax.eval_shape(levels, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    info = []
    for i in select_levels(len(shapes), out_indices):
        side = shapes[i].shape[1]
        info.append(
            dict(
                module=names[i],
                num_chs=int(shapes[i].shape[-1]),
                reduction=2 ** round(math.log2(input_shape[0] / side)),
                index=i,
            )
        )
    return info
