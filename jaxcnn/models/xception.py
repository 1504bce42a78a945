"""Xception (Chollet 2017, Fig. 5): depthwise separable convolutions throughout, in residual
blocks, as timm's ``legacy_xception`` lays it out.

The network is three flows of block rows: the entry flow (three blocks that halve the map and
widen to 128, 256, 728), the middle flow (one 728-wide block repeated eight times) and the exit
flow (a block widening to 1024, then separable convolutions to 1536 and 2048, global average,
classifier). A block is ``reps`` x (ReLU, separable 3x3 conv, BN), ending in a 3x3/2 max-pool
where it downsamples; its shortcut is a strided 1x1 conv + BN where the shape changes and the
identity otherwise. A separable convolution is a depthwise 3x3 (one filter per channel) then a
pointwise 1x1, with no BN or ReLU between them (the paper's finding, §4.7).

Each flow's blocks run through :class:`~jaxcnn.layers.stage.Stage`, one stage per flow: block b
of a flow is ``entry_flow/<b>``, ``middle_flow/<b>`` or ``exit_flow/<b>``. Inside a block the
names mirror timm's (``rep.<index>`` -> ``rep_<index>``, ``skip``, ``skipbn``), so timm's
``block<i>`` (numbered 1-12 through the three flows) converts with the table below.
``drop_path_rate`` drops the residual (separable) branch of each block with the linear-decay
rule; timm's model has none, so its default is 0.
"""

from typing import NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from ..convert import register_renames
from ..layers import (
    ClassifierHead,
    DropPath,
    batch_norm,
    check_image_batch,
    conv2d,
    depthwise_conv2d,
    drop_path_rates,
    make_divisible,
    max_pool,
    tap,
)
from ..layers.stage import Stage, stage_blocks
from ..registry import register


class Block(NamedTuple):
    """One row of a flow table."""

    out: int  # output channels
    reps: int  # separable convolutions in the block
    stride: int = 1  # > 1: a 3x3 max-pool with this stride ends the block
    start_with_relu: bool = True  # the first block reads the stem's (already ReLU'd) map
    grow_first: bool = True  # widen in the first separable conv, else in the last


# Chollet 2017, Fig. 5
ENTRY_FLOW = (Block(128, 2, 2, start_with_relu=False), Block(256, 2, 2), Block(728, 2, 2))
MIDDLE_FLOW = Block(728, 3)
MIDDLE_REPEATS = 8  # "repeated eight times"
EXIT_FLOW = (Block(1024, 2, 2, grow_first=False),)
# The stem's two plain 3x3 convolutions (the first stride 2, both unpadded) and the exit
# flow's last two separable convolutions.
STEM_WIDTHS = (32, 64)
EXIT_WIDTHS = (1536, 2048)
# conv1 (3x3/2, unpadded) must leave the 3x3 that conv2 (unpadded) reads; every later layer
# pads, so 7 px is the smallest input (timm's model agrees).
MIN_INPUT = 7


class SeparableConv(nn.Module):
    """Depthwise 3x3 (``conv1``) then pointwise 1x1 (``pointwise``), no bias, nothing between."""

    features: int
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = depthwise_conv2d(x.shape[-1], 3, name='conv1', **kw)(x)
        return conv2d(self.features, 1, name='pointwise', **kw)(x)


class XceptionBlock(nn.Module):
    """(ReLU -> separable conv -> BN) x reps [-> max-pool] + shortcut.

    The sub-modules keep the indices of timm's ``rep`` Sequential (ReLUs and the pool count),
    and the shortcut reads the block's input before the first ReLU.
    """

    row: Block
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        row, c_in = self.row, x.shape[-1]
        h, index = x, 0 if row.start_with_relu else -1
        for i in range(row.reps):
            if row.grow_first:
                out = row.out
            else:
                out = c_in if i < row.reps - 1 else row.out
            if index >= 0:
                h = nn.relu(h)
            h = SeparableConv(out, name=f'rep_{index + 1}', **kw)(h)
            h = batch_norm(train, name=f'rep_{index + 2}', **kw)(h)
            index += 3
        if row.stride != 1:
            h = max_pool(h, 3, row.stride, padding='torch')
        if row.out != c_in or row.stride != 1:
            x = conv2d(row.out, 1, row.stride, name='skip', **kw)(x)
            x = batch_norm(train, name='skipbn', **kw)(x)
        return DropPath(self.drop_path)(h, train) + x


class Xception(nn.Module):
    """stem -> entry flow -> middle flow (``middle_repeats`` x ``middle_flow``) -> exit flow.

    width: multiplies every width (small models for smoke tests); 1.0 is the reference.
    remat: recompute each block's activations in the backward pass instead of storing them
      (True, or a ``jax.checkpoint_policies`` name; :class:`~jaxcnn.layers.stage.Stage`).
    ``num_classes=0`` returns pooled features; ``features_only`` the final 2048-channel map.
    """

    entry_flow: Sequence[Block] = ENTRY_FLOW
    middle_flow: Block = MIDDLE_FLOW
    middle_repeats: int = MIDDLE_REPEATS
    exit_flow: Sequence[Block] = EXIT_FLOW
    stem_widths: Sequence[int] = STEM_WIDTHS
    exit_widths: Sequence[int] = EXIT_WIDTHS
    width: float = 1.0
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: Union[bool, str] = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    def flows(self):
        """(stage name, block rows) of the three flows, entry to exit, at this model's width."""
        flows = (
            ('entry_flow', self.entry_flow),
            ('middle_flow', (self.middle_flow,) * self.middle_repeats),
            ('exit_flow', self.exit_flow),
        )
        return [
            (name, [r._replace(out=make_divisible(r.out * self.width, 1)) for r in rows])
            for name, rows in flows
        ]

    def rows(self):
        """Every block row, entry to exit, at this model's width."""
        return [r for _, rows in self.flows() for r in rows]

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, MIN_INPUT, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        bn = lambda name, h: nn.relu(batch_norm(train, name=name, **kw)(h))
        w1, w2 = (make_divisible(c * self.width, 1) for c in self.stem_widths)
        x = bn('bn1', conv2d(w1, 3, 2, padding='valid', name='conv1', **kw)(x))
        x = tap(bn('bn2', conv2d(w2, 3, padding='valid', name='conv2', **kw)(x)), 'act2')
        rates = iter(drop_path_rates(self.drop_path_rate, len(self.rows())))
        i = 0  # timm's block number, 1-12 through the flows
        for name, rows in self.flows():
            blocks = stage_blocks(
                XceptionBlock, [dict(row=row, drop_path=next(rates), **kw) for row in rows]
            )
            outputs = Stage(blocks, remat=self.remat, every_output=True, name=name)(x, train)
            # feature levels: the ReLU that starts each downsampling block (timm's
            # block<i>.rep.0, the ReLU of the block's input; block 1's input is act2)
            for row, h in zip(rows, [x, *outputs[:-1]]):
                i += 1
                if row.stride > 1 and row.start_with_relu:
                    tap(nn.relu(h), f'block{i}.rep.0')
            x = outputs[-1]
        for j, c in enumerate(self.exit_widths):
            x = SeparableConv(make_divisible(c * self.width, 1), name=f'conv{j + 3}', **kw)(x)
            x = bn(f'bn{j + 3}', x)
        tap(x, 'act4')
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


def _timm_block(m):
    """timm's block<i> (1-12: entry 1-3, middle 4-11, exit 12) -> its flow's stage and index."""
    i = int(m[1]) - 1
    for name, n in (
        ('entry_flow', len(ENTRY_FLOW)),
        ('middle_flow', MIDDLE_REPEATS),
        ('exit_flow', len(EXIT_FLOW)),
    ):
        if i < n:
            return f'{name}.{i}.'
        i -= n
    return m[0]


register_renames(
    'xception',
    [
        (r'^block(\d+)\.', _timm_block),
        (r'\.rep\.(\d+)\.', r'.rep_\1.'),
        (r'^fc\.', 'head.fc.'),
    ],
)

register(
    'xception',
    Xception,
    {},
    family='xception',
    input_size=(299, 299, 3),
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    min_input=MIN_INPUT,
    reference='timm legacy_xception (Chollet 2017, Fig. 5)',
    reference_params=22_855_952,
    torch_name='timm:legacy_xception',
)
