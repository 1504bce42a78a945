"""U-Net on any backbone: the expanding path of Ronneberger, Fischer & Brox 2015 (§2, Fig. 1)
over the feature pyramid of a registered classifier (``create_model(name, features_only=True)``).

The contracting path is the backbone's: its levels, finest first (``jaxcnn.feature_info``). The
expanding path starts at the coarsest level; at each finer level a transposed convolution with
kernel and stride equal to the scale step (the U-Net's 2x2 up-convolution where the step is 2)
brings the map to the level's size, the level's map is concatenated (the skip connection), and
two 3x3 convolutions with ReLU follow, ``decoder_widths[i]`` wide (the level's own channels by
default, as U-Net mirrors its widths). Where the finest level is coarser than the input, one more
up-convolution returns to the input's size; a per-pixel linear layer gives the logits
(B, H, W, num_classes). A map whose side the strides rounded up (28 -> 14 -> 7 -> 4) is cropped
centrally to its skip's size, as the paper crops its skips.

The backbone's variables sit at the top level under their classifier names, so a classifier
trained or downloaded for ``backbone`` initialises the encoder unchanged
(``--config.init_from`` with ``--config.transfer.trainable='^(decoder|head)/'``).
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ..layers.features import tap, tapped
from ..registry import CIFAR10_MEAN, CIFAR10_STD, create_model, register
from .unet import DoubleConv, PixelHead, _HE_NORMAL


def _fit(x, hw):
    """``x`` centre-cropped, or zero-padded, to spatial size ``hw``."""
    for axis, want in ((1, hw[0]), (2, hw[1])):
        have = x.shape[axis]
        if have > want:
            start = (have - want) // 2
            x = jnp.take(x, jnp.arange(start, start + want), axis=axis)
        elif have < want:
            pad = [(0, 0)] * x.ndim
            pad[axis] = ((want - have) // 2, want - have - (want - have) // 2)
            x = jnp.pad(x, pad)
    return x


class UpTo(nn.Module):
    """A transposed convolution by the power-of-two step from ``x``'s size to ``hw``, then
    :func:`_fit`; nothing but the fit where the sizes already agree."""

    features: int
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, hw):
        step = 2 ** max(0, round(math.log2(hw[0] / x.shape[1])))
        if step > 1:
            x = nn.ConvTranspose(
                self.features,
                (step, step),
                strides=(step, step),
                padding='VALID',
                transpose_kernel=True,
                kernel_init=_HE_NORMAL,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name='up',
            )(x)
        return _fit(x, hw)


class UNetDecoder(nn.Module):
    """The expanding path over ``levels`` (finest first), up to spatial size ``out_hw``."""

    widths: Optional[Sequence[int]] = None
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, levels, out_hw):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = list(self.widths or [m.shape[-1] for m in levels])
        if len(widths) != len(levels):
            raise ValueError(
                f'decoder_widths has {len(widths)} entries for a backbone with {len(levels)} '
                'feature levels; give one per level, finest first'
            )
        x = levels[-1]
        for i in reversed(range(len(levels) - 1)):
            x = UpTo(widths[i], name=f'up{i}', **kw)(x, levels[i].shape[1:3])
            x = jnp.concatenate([levels[i], x], axis=-1)
            x = DoubleConv(widths[i], name=f'dec{i}', **kw)(x)
        if tuple(x.shape[1:3]) != tuple(out_hw):
            x = DoubleConv(widths[0], name='dec_out', **kw)(
                UpTo(widths[0], name='up_out', **kw)(x, out_hw)
            )
        return x


class PyramidUNet(nn.Module):
    """U-Net with ``backbone`` (a registered model name, with ``backbone_kwargs`` as its
    overrides) as the contracting path. ``num_classes=0`` (or ``features_only``) returns the
    last decoder map; under a feature pyramid the levels are the backbone's."""

    backbone: str = 'resnet20'
    backbone_kwargs: Any = None
    decoder_widths: Optional[Sequence[int]] = None
    num_classes: int = 2
    drop_rate: float = 0.0  # dropout on the coarsest level, the end of the contracting path (§3.1)
    drop_path_rate: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kwargs = dict(self.backbone_kwargs or {})
        if self.drop_path_rate:
            kwargs['drop_path_rate'] = self.drop_path_rate
        self.encoder = create_model(
            self.backbone, 0, dtype=self.dtype, param_dtype=self.param_dtype, **kwargs
        )
        # the encoder's variables keep their classifier names, so classifier weights load
        nn.share_scope(self, self.encoder)
        self.dropout = nn.Dropout(self.drop_rate)
        self.decoder = UNetDecoder(
            self.decoder_widths, dtype=self.dtype, param_dtype=self.param_dtype
        )
        self.head = PixelHead(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x, train: bool = False, features_only: bool = False):
        levels = tapped(self.encoder, x, train)
        for name, level in levels:  # offered again to a pyramid over this model
            tap(level, name)
        maps = [m for _, m in levels]
        maps[-1] = self.dropout(maps[-1], deterministic=not train)
        y = self.decoder(maps, x.shape[1:3])
        return y if features_only else self.head(y)


def segmentation_model(backbone: str, num_classes: int, **backbone_kwargs) -> PyramidUNet:
    """A U-Net over any registered ``backbone`` with ``num_classes`` per-pixel outputs; the
    keyword arguments are the backbone's (``stem='cifar'``, ``drop_path_rate``...)."""
    create_model(backbone, 0, **backbone_kwargs)  # a wrong name or argument fails here
    return PyramidUNet(backbone, backbone_kwargs or None, num_classes=num_classes)


# ResNet-20 (He et al. 2016, Table 6) as the contracting path: levels act1 16 r1, layer1 16 r1,
# layer2 32 r2, layer3 64 r4 at 32 px, so decoder widths 16-16-32. Hand count: the backbone's
# 269,072 (ResNet-20's 269,722 less its 64 x 10 + 10 classifier); the expanding path's 51,888:
# up2 2x2x64x32+32 = 8,224, dec2 3x3x64x32+32 + 3x3x32x32+32 = 27,712, up1 2x2x32x16+16 = 2,064,
# dec1 and dec0 3x3x32x16+16 + 3x3x16x16+16 = 6,944 each (act1 and layer1 share a size: no
# up-convolution between them); and the per-pixel classifier's 16 x 10 + 10.
register(
    'unet_resnet20',
    PyramidUNet,
    dict(backbone='resnet20'),
    family='unet',
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_classes=10,
    min_input=8,
    reference='Ronneberger et al. 2015, Fig. 1 expanding path over He et al. 2016 ResNet-20 '
    '(Table 6); hand count',
    reference_params=269_072 + 8_224 + 27_712 + 2_064 + 2 * 6_944 + 170,
)
