"""Hyper Residual Networks: a Wide ResNet whose 3x3 kernels come from a static hypernetwork.

Ha, Dai & Le 2016, "HyperNetworks", §3.1 and §4.2: every kernel of the WRN's three groups
(conv2-conv4 of their Table 1: 36 layers for depth 40) is tiled from 16 x 16 basic kernels,
each g(z) of its own 64-dimensional embedding, through one two-layer linear generator g shared
by all layers (:class:`jaxcnn.layers.dynamic.HyperKernelGenerator`, eq. 2-3). The stem conv
(3 input channels), BatchNorm, the classifier and the conv biases stay ordinary parameters.

Parameter count. The paper's Table 2 gives 0.097M (Hyper WRN 40-1) and 0.148M (Hyper WRN 40-2)
beside 0.563M and 2.236M for its own plain WRN 40-1 / 40-2. A pre-activation WRN with
parameter-free shortcuts (option A: subsample + zero-pad the new channels) and a bias on every
convolution meets the two hyper figures and the plain 40-1 exactly, and the plain 40-2 to 2
parameters of its rounding edge (2,235,498); with 1x1 projection shortcuts instead, both 40-2
counts come out ~0.008M over the table (plain 2,243,546, hyper 155,626). So this is the layout
built here:

  Hyper WRN 40-2 = 966 embeddings x 64 (61,824) + generator 75,920 + stem 448 + conv biases
                   2,688 + BN 5,408 + classifier 1,290 = 147,578  (Table 2: 0.148M)
  Hyper WRN 40-1 = 242 x 64 (15,488) + 75,920 + 448 + 1,344 + 2,720 + 650 = 96,570 (0.097M)

(the same layout with ordinary kernels has 562,730 / 2,235,498 parameters).

One addition to eq. 2: each generated kernel is scaled by the constant sqrt(16 / C_in)
(``fan_in_scale``, see :class:`jaxcnn.layers.dynamic.HyperConv`); it adds no parameter.

Each group's blocks run through :class:`~jaxcnn.layers.stage.Stage` (block b of group s, from 1,
is ``layer{s}/{b}``, holding its embeddings); the one generator, ``generator``, is a field of
every block and lives at the top of the model.
"""

from typing import Any, Optional, Union

import flax.linen as nn
import jax.numpy as jnp

from ..layers import (
    ClassifierHead,
    DropPath,
    batch_norm,
    check_image_batch,
    conv2d,
    drop_path_rates,
    tap,
)
from ..layers.dynamic import HyperConv, HyperKernelGenerator
from ..layers.stage import Stage, stage_blocks
from ..registry import CIFAR10_MEAN, CIFAR10_STD, register


def zero_pad_shortcut(x, out_channels: int, stride: int):
    """He et al.'s option A: subsample by ``stride``, zero-pad the new channels equally."""
    if stride != 1:
        x = x[:, ::stride, ::stride, :]
    extra = out_channels - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class HyperBlock(nn.Module):
    """Pre-activation WRN block B(3,3) whose two kernels are generated:
    BN-ReLU-hyperconv(stride)-BN-ReLU-dropout-hyperconv, + option-A shortcut of the input.

    generator: the network's shared :class:`~jaxcnn.layers.dynamic.HyperKernelGenerator` (a
      module owned by the model, so every block's kernels come from the same g).
    """

    features: int
    generator: Any = None
    stride: int = 1
    dropout: float = 0.0
    drop_path: float = 0.0
    fan_in_scale: bool = True
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        generator = self.generator
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        shortcut = zero_pad_shortcut(x, self.features, self.stride)
        h = nn.relu(batch_norm(train, name='bn1', **kw)(x))
        h = HyperConv(
            self.features,
            3,
            self.stride,
            use_bias=True,
            fan_in_scale=self.fan_in_scale,
            name='conv1',
            **kw,
        )(h, generator)
        h = nn.relu(batch_norm(train, name='bn2', **kw)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = HyperConv(
            self.features, 3, 1, use_bias=True, fan_in_scale=self.fan_in_scale, name='conv2', **kw
        )(h, generator)
        return DropPath(self.drop_path)(h, train) + shortcut


class HyperWRN(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016, as in Ha et al.'s Table 1) with generated kernels.

    depth = 6 N + 4; group widths 16k, 32k, 64k (multiples of the 16 x 16 basic kernel).
    z_dim / hidden: the generator's N_z and d (64 and 64 in the paper).
    fan_in_scale: scale each generated kernel by sqrt(16 / C_in) (a constant; see
      :class:`jaxcnn.layers.dynamic.HyperConv`), so wide layers start at the basic kernel's scale.
    remat: recompute each block's activations in the backward pass instead of storing them
      (True, or a ``jax.checkpoint_policies`` name; :class:`~jaxcnn.layers.stage.Stage`).
    """

    depth: int = 40
    widen_factor: int = 2
    num_classes: int = 10
    z_dim: int = 64
    hidden: int = 64
    basic_size: int = 16
    stem_width: int = 16
    fan_in_scale: bool = True
    block_dropout: float = 0.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: Union[bool, str] = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        if (self.depth - 4) % 6:
            raise ValueError(f'HyperWRN depth must be 6N + 4, got {self.depth}')
        n = (self.depth - 4) // 6
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, 8, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        generator = HyperKernelGenerator(
            self.z_dim,
            self.hidden,
            3,
            self.basic_size,
            self.basic_size,
            param_dtype=self.param_dtype,
            name='generator',
        )
        x = conv2d(self.stem_width, 3, 1, use_bias=True, name='conv1', **kw)(x)
        tap(x, 'conv1')
        rates = drop_path_rates(self.drop_path_rate, 3 * n)
        for s, width in enumerate((16, 32, 64)):
            blocks = stage_blocks(
                HyperBlock,
                [
                    dict(
                        features=width * self.widen_factor,
                        generator=generator,
                        stride=2 if (s > 0 and b == 0) else 1,
                        dropout=self.block_dropout,
                        drop_path=rates[s * n + b],
                        fan_in_scale=self.fan_in_scale,
                        **kw,
                    )
                    for b in range(n)
                ],
            )
            x = Stage(blocks, remat=self.remat, name=f'layer{s + 1}')(x, train)
            tap(x, f'layer{s + 1}')
        x = nn.relu(batch_norm(train, name='final_bn', **kw)(x))
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


_CIFAR = dict(
    family='hypernet',
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_classes=10,
    min_input=8,
)
for _k, _m in [(1, 0.097), (2, 0.148)]:
    register(
        f'hyper_wrn40_{_k}',
        HyperWRN,
        dict(depth=40, widen_factor=_k),
        reference=f'Ha, Dai & Le 2016, HyperNetworks, Table 2 (Hyper Residual Network 40-{_k}, '
        f'{_m}M)',
        reference_params=_m * 1e6,
        params_rounding=1e3,
        **_CIFAR,
    )
