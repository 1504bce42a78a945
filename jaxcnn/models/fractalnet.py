"""FractalNet: ultra-deep networks without residuals (Larsson, Maire & Shakhnarovich 2017, ICLR).

The block is the fractal expansion rule (§3, Fig. 1)

    f_1(z) = conv(z),        f_{C+1}(z) = join(f_C(f_C(z)), conv(z)),

with conv = 3x3 convolution - BatchNorm - ReLU and join = the element-wise mean of its inputs.
Column j (0 = shallowest) holds 2^j convolutions, so the longest path through a block has
2^(C-1); B blocks, each followed by a 2x2 max-pool, make a network B * 2^(C-1) layers deep. As in
the paper's Fig. 1 (and the authors' released generator, gustavla/fractalnet), nested joins
are flattened: a join merges every column that ends at its depth, e.g. the last join of a
C-column block has C inputs, not a mean of a mean.

Drop-path (§3.1): at training time each join averages only its *active* inputs.
  * local sampling: a join drops each input independently with probability ``drop_path_rate``
    (the paper's 15 %), keeping at least one (if all are dropped, one chosen uniformly survives);
  * global sampling: one column is chosen for the whole network and every join keeps only its
    input from that column, so the network computes exactly that column (a plain chain of
    B * 2^j conv layers). A join the chosen column does not cross feeds only columns that are
    dropped further on; it keeps all its inputs, so the convolutions behind it see ordinary
    activations (their BatchNorm statistics are not dragged towards zero).
Local and global sampling are alternated by mini-batch as the paper mixes them 50/50: for each
forward pass (one mini-batch; one step of the trainer) a coin drawn from the 'dropout' RNG
picks global sampling with probability ``global_drop_ratio`` (0.5) and local sampling
otherwise; the global column is drawn uniformly from the same stream. The choice is per
mini-batch, like the masks themselves (each mini-batch sees a different active subnetwork,
Fig. 2). ``drop_path_rate = 0`` turns drop-path (both kinds) off.

``column=k`` (a field, or an argument of ``__call__`` that overrides it) evaluates column k
alone, with the full network's variables: the paper's "deepest column alone" row of Table 1 is
``column=C-1``. Only that column's convolutions run.

Dropout: the authors' layer is conv - dropout - BN - ReLU with one rate per block, (0, 0.1, 0.2,
0.3, 0.4) in the "+ drop-path + dropout" rows (§3.3); that is ``block_dropout`` (off in the
registered row). ``drop_rate`` is the classifier's dropout, as for every jaxcnn model.

Pooling: the paper joins, then pools (Fig. 1); the authors' Caffe nets pool each column before
the block's last join "purely for convenience" (§3.3). This file joins then pools.

Registered row and its parameter count (see tests/test_fractalnet.py):
  ``fractalnet20``: Table 1's "FractalNet (20 layers)" for CIFAR: B = 5, C = 3 (5 * 2^2 = 20;
  C = 4 would be 40 layers), channels (64, 128, 256, 512, 512), 2x2 max-pool after every block
  so a 32x32 input ends at 1x1x512, then a linear softmax layer. Table 1 prints 38.6M parameters,
  but that figure does not follow from this layout: the 7 convolutions per block give
  33,698,880 weights (convolutions reading the block input take c_in channels), plus 20,608 BN
  scales/shifts and 5,130 in the classifier = 33,724,618 (33.7M). The authors' own generator
  builds this same layout (their convolutions carry biases and their BatchNorm has no affine
  parameters: 33,714,314, also 33.7M), and an independent reimplementation reports the same
  33.7M against the paper's 38.6M (khanrc/pt.fractalnet, exp-note). The registry therefore
  carries the exact hand count of the layout; the 38.6M is not reproduced. (A layout in which
  every 3x3 conv of a block reads c channels, behind a 1x1 conv that changes the width at the
  block's entry, would count about 38.65M and round to the table; neither the paper's text nor
  the authors' generator has such convolutions, so it is not built.) The 40-layer net of
  Table 1 (22.9M) is not registered: with these channels C = 4 counts 76,106,634, and no
  narrower channel table giving 22.9M was found.
Section, figure and table numbers are this file's reading of the ICLR 2017 version.
"""

from typing import Dict, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..layers import ClassifierHead, batch_norm, check_image_batch, conv2d, max_pool, tap
from ..registry import CIFAR10_MEAN, CIFAR10_STD, register


def fractal_depth(num_blocks: int, columns: int) -> int:
    """Convolutions on the longest path: B blocks of 2^(C-1)."""
    return num_blocks * 2 ** (columns - 1)


def join(branches, mask=None):
    """Element-wise mean of the active branches (``mask``: one bool per branch, None = all).

    The weights are 0/1 divided by the number of active inputs, so a dropped input costs
    nothing to rescale: the mean of the survivors is already on the right scale (§3.1)."""
    if mask is None:
        return sum(branches[1:], branches[0]) / len(branches)
    w = mask.astype(branches[0].dtype)
    total = sum((w[i] * b for i, b in enumerate(branches[1:], 1)), w[0] * branches[0])
    return total / jnp.maximum(jnp.sum(w), 1)


def local_drop_mask(key, num_inputs: int, rate):
    """Keep each input with probability 1 - rate; if none survives, keep one chosen uniformly."""
    k_keep, k_one = jax.random.split(key)
    keep = jax.random.bernoulli(k_keep, 1.0 - rate, (num_inputs,))
    one = jax.nn.one_hot(jax.random.randint(k_one, (), 0, num_inputs), num_inputs) > 0
    return jnp.where(keep.any(), keep, one)


def global_drop_mask(input_columns: Sequence[int], column):
    """Keep only the input coming from ``column``; a join it does not cross keeps every input
    (its output reaches only dropped paths, so it does not change the network's output)."""
    mask = jnp.asarray(input_columns) == column
    return jnp.where(mask.any(), mask, jnp.ones_like(mask))


class ConvBNReLU(nn.Module):
    """The paper's conv layer: 3x3 convolution - (dropout) - BatchNorm - ReLU."""

    features: int
    dropout: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = conv2d(self.features, 3, name='conv', **kw)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.relu(batch_norm(train, name='bn', **kw)(x))


class FractalBlock(nn.Module):
    """f_C by the expansion rule; convolution i of column j is the submodule ``col{j}_conv{i}``.

    ``drop_plan``: None (every join averages all its inputs), or ``(is_global, column, rate)``:
    global sampling of ``column`` where ``is_global`` is true, else local sampling at ``rate``.
    ``column``: run only that column's 2^column convolutions.
    """

    features: int
    columns: int
    dropout: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    def conv(self, col: int, index: int):
        return ConvBNReLU(
            self.features,
            self.dropout,
            name=f'col{col}_conv{index}',
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def join_columns(self, branches: Dict[int, jnp.ndarray], drop_plan):
        cols = sorted(branches)
        xs = [branches[c] for c in cols]
        if len(xs) == 1:
            return xs[0]
        if drop_plan is None:
            return join(xs)
        is_global, column, rate = drop_plan
        local = local_drop_mask(self.make_rng('dropout'), len(xs), rate)
        return join(xs, jnp.where(is_global, global_drop_mask(cols, column), local))

    @nn.compact
    def __call__(self, x, train: bool = False, drop_plan=None, column: Optional[int] = None):
        C = self.columns
        if column is not None:
            for i in range(2**column):
                x = self.conv(column, i)(x, train)
            return x
        made = {c: 0 for c in range(C)}

        def conv(col, z):
            made[col] += 1
            return self.conv(col, made[col] - 1)(z, train)

        def expand(z, n):
            # f_n(z) over the deepest n columns, C-n .. C-1, returned un-joined (by column) so
            # the enclosing join merges all columns ending here at once
            if n == 1:
                return {C - 1: conv(C - 1, z)}
            inner = expand(z, n - 1)
            out = expand(self.join_columns(inner, drop_plan), n - 1)
            out[C - n] = conv(C - n, z)
            return out

        return self.join_columns(expand(x, C), drop_plan)


class FractalNet(nn.Module):
    """B = len(widths) fractal blocks of ``columns`` columns, each followed by a 2x2 max-pool."""

    widths: Sequence[int] = (64, 128, 256, 512, 512)
    columns: int = 3
    block_dropout: Union[float, Sequence[float]] = 0.0  # per block (or one rate for all)
    global_drop_ratio: float = 0.5
    column: Optional[int] = None
    num_classes: int = 10
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # local drop-path rate; 0 turns drop-path off
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x, train: bool = False, features_only: bool = False, column: Optional[int] = None
    ):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        column = self.column if column is None else column
        if column is not None and not 0 <= column < self.columns:
            raise ValueError(f'column must be in [0, {self.columns}), got {column}')
        B = len(self.widths)
        dropout = self.block_dropout
        dropout = tuple(dropout) if isinstance(dropout, (tuple, list)) else (dropout,)
        dropout = dropout * B if len(dropout) == 1 else dropout
        if len(dropout) != B:
            raise ValueError(f'block_dropout needs one rate per block ({B}), got {dropout}')
        check_image_batch(x, 2**B, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)

        drop_plan = None
        if train and column is None and self.drop_path_rate > 0:
            # one draw per mini-batch: local or global sampling, and the global column
            k_mode, k_col = jax.random.split(self.make_rng('dropout'))
            is_global = jax.random.bernoulli(k_mode, self.global_drop_ratio)
            drop_plan = (
                is_global,
                jax.random.randint(k_col, (), 0, self.columns),
                self.drop_path_rate,
            )
        for b, width in enumerate(self.widths):
            x = FractalBlock(width, self.columns, dropout[b], name=f'block{b + 1}', **kw)(
                x, train, drop_plan, column
            )
            tap(x, f'block{b + 1}')
            x = max_pool(x, 2, 2, padding='valid')
        tap(x, f'pool{B}')  # the last pool's output, as timm's VGG ends at its last max-pool
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


_CIFAR = dict(
    family='fractalnet',
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_classes=10,
    min_input=32,
)
register(
    'fractalnet20',
    FractalNet,
    dict(widths=(64, 128, 256, 512, 512), columns=3),
    reference='Larsson et al. 2017, FractalNet, Table 1 ("20 layers": B=5, C=3, channels '
    '64-128-256-512-512, §3.3; hand count of that layout in tests/test_fractalnet.py '
    '-- the table prints 38.6M, which the layout does not give)',
    reference_params=33_724_618,
    **_CIFAR,
)
