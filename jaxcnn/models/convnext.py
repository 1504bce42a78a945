"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s", arXiv:2201.03545, §2-3).

A ResNet "modernised" one design choice at a time until it matched Swin transformers:
  * patchify stem: a 4x4 convolution with stride 4, then LayerNorm (Swin's patch embedding);
  * stage compute ratio (3, 3, 9, 3) blocks (T) or (3, 3, 27, 3) (S/B/L/XL), widths C, 2C, 4C, 8C;
  * separate downsampling layers between stages: LayerNorm then a 2x2 stride-2 convolution;
  * the block is an inverted bottleneck with the depthwise convolution moved up front:
      x + drop_path(gamma * fc2(GELU(fc1(LN(dwconv7x7(x))))))
    with fc1 expanding to 4C and fc2 back to C (1x1 convolutions = Linear layers on NHWC),
    one LayerNorm and one GELU per block, and layer scale gamma initialised to 1e-6;
  * head: global average pool, LayerNorm, Linear.

Stochastic depth grows linearly from 0 at the first block to ``drop_path_rate`` at the last,
as in the paper's code. Layout and names follow timm's ``ConvNeXt`` (``stem``, ``stages.s.
downsample``, ``stages.s.blocks.b`` with ``conv_dw``/``norm``/``mlp.fc1``/``mlp.fc2``/``gamma``,
``head.norm``/``head.fc``), so its weights convert with the rename table below.

Each stage's blocks are identical, so ``scan_blocks`` runs them through ``nn.scan`` (weights
stacked on a leading axis under ``stages_{s}/stacked/block``): compile time then no longer grows
with depth, which matters for the 27-block third stage of S/B/L/XL.
"""

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ..convert import register_renames
from ..layers import (
    ClassifierHead,
    DropPath,
    check_image_batch,
    conv2d,
    depthwise_conv2d,
    get_act,
    global_avg_pool,
    tap,
)
from ..layers.layer_scale import LayerScale
from ..layers.stage import Stage, stage_blocks
from ..registry import register

# The official code initialises every conv and linear with trunc_normal(std=0.02), biases zero.
_INIT = nn.initializers.truncated_normal(0.02)
LN_EPS = 1e-6


def layer_norm(name, dtype=None, param_dtype=jnp.float32):
    """LayerNorm over the channel (last) axis of NHWC maps: the paper's "LN" everywhere.

    Two-pass variance (not E[x^2] - E[x]^2), so converted models match PyTorch to fp32 precision.
    """
    return nn.LayerNorm(
        epsilon=LN_EPS, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name
    )


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> LN -> 1x1 (4C) -> GELU -> 1x1 (C) -> gamma -> drop path, + identity (Fig. 4)."""

    dim: int
    mlp_ratio: int = 4
    kernel_size: int = 7
    ls_init_value: float = 1e-6
    act: str = 'gelu'
    drop_path: float = 0.0  # may be a traced scalar inside nn.scan
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = depthwise_conv2d(
            self.dim, self.kernel_size, use_bias=True, kernel_init=_INIT, name='conv_dw', **kw
        )(x)
        h = layer_norm('norm', **kw)(h)
        h = nn.Dense(self.mlp_ratio * self.dim, kernel_init=_INIT, name='fc1', **kw)(h)
        h = get_act(self.act)(h)
        h = nn.Dense(self.dim, kernel_init=_INIT, name='fc2', **kw)(h)
        h = LayerScale(self.ls_init_value, self.param_dtype, name='layer_scale')(h)
        return x + DropPath(self.drop_path)(h, train)


class ConvNeXt(nn.Module):
    """ConvNeXt from its stage table: ``depths`` blocks of width ``dims`` per stage.

    ``features_only`` returns the last stage's map (before the head's LayerNorm);
    ``num_classes=0`` returns the pooled, normalised features (timm's pre-logits).
    ``scan_blocks`` runs each stage's blocks as one ``nn.scan`` (``stages_{s}/stacked``);
    ``remat`` recomputes each block's activations in the backward pass
    (:class:`~jaxcnn.layers.stage.Stage`).
    """

    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    patch_size: int = 4
    kernel_size: int = 7
    mlp_ratio: int = 4
    ls_init_value: float = 1e-6
    act: str = 'gelu'
    scan_blocks: bool = True
    remat: Union[bool, str] = False
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        check_image_batch(x, self.patch_size * 2 ** (len(self.depths) - 1), type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        # patchify: non-overlapping p x p patches, each linearly embedded, then LN
        x = conv2d(
            self.dims[0],
            self.patch_size,
            self.patch_size,
            padding='valid',
            use_bias=True,
            kernel_init=_INIT,
            name='stem_conv',
            **kw,
        )(x)
        x = layer_norm('stem_norm', **kw)(x)

        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        start = 0
        for s, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if s > 0:
                # separate downsampling layer (§2.2 "macro design"): LN, then 2x2 conv, stride 2
                x = layer_norm(f'stages_{s}_down_norm', **kw)(x)
                x = conv2d(
                    dim,
                    2,
                    2,
                    padding='valid',
                    use_bias=True,
                    kernel_init=_INIT,
                    name=f'stages_{s}_down_conv',
                    **kw,
                )(x)
            stage_rates = rates[start : start + depth]
            start += depth
            blocks = stage_blocks(
                ConvNeXtBlock,
                [
                    dict(
                        dim=dim,
                        mlp_ratio=self.mlp_ratio,
                        kernel_size=self.kernel_size,
                        ls_init_value=self.ls_init_value,
                        act=self.act,
                        drop_path=r,
                        **kw,
                    )
                    for r in stage_rates
                ],
            )
            x = Stage(
                blocks, unrolled=0, scan=self.scan_blocks, remat=self.remat, name=f'stages_{s}'
            )(x, train)
            tap(x, f'stages.{s}')
        if features_only:
            return x
        # head: pool first, then LN on the pooled vector (the paper's ordering), then the classifier
        x = layer_norm('head_norm', **kw)(global_avg_pool(x))
        return ClassifierHead(
            self.num_classes, self.drop_rate, kernel_init=_INIT, name='head', **kw
        )(x, train)


# ---------------------------------------------------------------------------------------------
# Weight conversion from timm's ConvNeXt. Block b of stage s becomes stages_s/b, which the stage
# helper's rule stacks into stages_s/stacked/block at index b.
register_renames(
    'convnext',
    [
        (r'^stem\.0\.', 'stem_conv.'),
        (r'^stem\.1\.', 'stem_norm.'),
        (r'^stages\.(\d+)\.downsample\.0\.', r'stages_\1_down_norm.'),
        (r'^stages\.(\d+)\.downsample\.1\.', r'stages_\1_down_conv.'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.', r'stages_\1.\2.'),
        (r'\.mlp\.fc(\d)\.', r'.fc\1.'),
        (r'\.gamma$', '.layer_scale.gamma'),
        (r'^head\.norm\.', 'head_norm.'),
    ],
)

# §3 of the paper ("ConvNeXt-T: C = (96, 192, 384, 768), B = (3, 3, 9, 3)" ...): blocks per
# stage and the stage-1 width C. Counts: timm 1.0.31
# (torchvision 0.29.1 agrees for T/S/B/L), 1000 classes.
CONVNEXT_VARIANTS = {
    'convnext_tiny': ((3, 3, 9, 3), 96, 28_589_128),
    'convnext_small': ((3, 3, 27, 3), 96, 50_223_688),
    'convnext_base': ((3, 3, 27, 3), 128, 88_591_464),
    'convnext_large': ((3, 3, 27, 3), 192, 197_767_336),
    'convnext_xlarge': ((3, 3, 27, 3), 256, 350_196_968),
}
for _name, (_depths, _c, _count) in CONVNEXT_VARIANTS.items():
    register(
        _name,
        ConvNeXt,
        dict(depths=_depths, dims=(_c, 2 * _c, 4 * _c, 8 * _c)),
        family='convnext',
        input_size=(224, 224, 3),
        min_input=32,
        reference=f'timm {_name} (Liu et al. 2022, §3: C={_c}, B={_depths})',
        reference_params=_count,
        torch_name=f'timm:{_name}',
    )
