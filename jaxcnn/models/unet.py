"""A small U-Net (Ronneberger, Fischer & Brox 2015, U-Net, §2 and Fig. 1) for segmentation.

Contracting path: at each level two 3x3 convolutions with ReLU, then a 2x2/2 max-pool; the
channels double from level to level. Expanding path: a 2x2 "up-convolution" (a transposed
convolution, stride 2) halves the channels and doubles the map, its output is concatenated
with the contracting path's map of the same level (the skip connection), and two 3x3
convolutions with ReLU follow. A 1x1 convolution maps the last map to per-pixel class logits.

``unet_small`` is Fig. 1 with every width divided by 8 (8-16-32-64-128 instead of
64-...-1024). One deliberate change: the 3x3 convolutions are padded (the paper's are
unpadded, 572 -> 388 px, and crop the skip maps), so the logits have the input's size:
(B, H, W, num_classes), for any H and W divisible by 16. Initialisation is the paper's §3:
N(0, 2 / fan_in). Dropout (``drop_rate``, off by default) sits at the end of the
contracting path, where §3.1 puts it.

Transposed convolution. A strided convolution y = conv(x, W), with W of shape
(kh, kw, C_x, C_y) (HWIO), is linear in x; its transpose takes y back to x's shape:
conv_transpose(y) = d/dx <conv(x, W), y>, the vector-Jacobian product. The up-convolution is
``nn.ConvTranspose(C_x, (2, 2), strides=(2, 2), transpose_kernel=True)``, which computes
exactly that with its kernel stored as W: shape (kh, kw, C_x, C_y), i.e. (kh, kw, out, in) of
the up-convolution. This is also ``torch.nn.functional.conv_transpose2d`` with weight
(C_y, C_x, kh, kw), which is W after the usual OIHW <-> HWIO transpose (tests/test_unet.py
checks both). Without ``transpose_kernel`` flax would correlate the dilated input with the
stored kernel unflipped and unswapped: a different operator for the same array.

The per-pixel classifier is the head: a Dense applied per pixel (= the 1x1 convolution) named
``head/fc``. ``num_classes=0`` (like ``features_only``) returns the last decoder map.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ..layers import check_image_batch, conv2d, max_pool, tap
from ..registry import register

WIDTHS_FIG1 = (64, 128, 256, 512, 1024)
WIDTHS_SMALL = tuple(w // 8 for w in WIDTHS_FIG1)  # (8, 16, 32, 64, 128)
# §3: "drawing the initial weights from a Gaussian distribution with a standard deviation of
# sqrt(2/N), where N denotes the number of incoming nodes of one neuron"
_HE_NORMAL = nn.initializers.he_normal()


def up_conv(
    features: int,
    name: Optional[str] = None,
    dtype=None,
    param_dtype=jnp.float32,
    use_bias: bool = True,
) -> nn.ConvTranspose:
    """The 2x2 stride-2 up-convolution: the adjoint of a 2x2 stride-2 convolution."""
    return nn.ConvTranspose(
        features,
        (2, 2),
        strides=(2, 2),
        padding='VALID',
        transpose_kernel=True,
        use_bias=use_bias,
        kernel_init=_HE_NORMAL,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class DoubleConv(nn.Module):
    """Two padded 3x3 convolutions, each followed by ReLU."""

    features: int
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(
            use_bias=True, kernel_init=_HE_NORMAL, dtype=self.dtype, param_dtype=self.param_dtype
        )
        x = nn.relu(conv2d(self.features, 3, name='conv1', **kw)(x))
        return nn.relu(conv2d(self.features, 3, name='conv2', **kw)(x))


class PixelHead(nn.Module):
    """Per-pixel linear classifier ``fc`` (the 1x1 convolution); identity when num_classes=0."""

    num_classes: int
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not self.num_classes:
            return x
        return nn.Dense(
            self.num_classes,
            kernel_init=_HE_NORMAL,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name='fc',
        )(x)


class UNet(nn.Module):
    """down1..down{L-1} (DoubleConv + 2x2 max-pool) -> bottom -> (up_i, concat skip_i, dec_i)
    for i = L-1..1 -> head. Returns per-pixel logits (B, H, W, num_classes)."""

    widths: Sequence[int] = WIDTHS_SMALL
    num_classes: int = 2
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # no residual blocks to drop; accepted for a uniform surface
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.widths)
        factor = 2 ** (levels - 1)
        check_image_batch(x, factor, type(self).__name__)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f'{type(self).__name__} with {levels} levels needs H and W divisible by '
                f'{factor}, got {x.shape[1]}x{x.shape[2]}; pad or crop the images'
            )
        x = jnp.asarray(x, self.dtype or jnp.float32)
        skips = []
        for i, w in enumerate(self.widths[:-1]):
            x = DoubleConv(w, name=f'down{i + 1}', **kw)(x)
            skips.append(tap(x, f'down{i + 1}'))
            x = max_pool(x, 2, 2, padding='valid')
        # the pyramid is the encoder's: each level before its pool, then the bottleneck
        x = tap(DoubleConv(self.widths[-1], name='bottom', **kw)(x), 'bottom')
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        for i in reversed(range(levels - 1)):
            x = up_conv(self.widths[i], name=f'up{i + 1}', **kw)(x)
            x = jnp.concatenate([skips[i], x], axis=-1)
            x = DoubleConv(self.widths[i], name=f'dec{i + 1}', **kw)(x)
        if features_only:
            return x
        return PixelHead(self.num_classes, name='head', **kw)(x)


# 1 input channel and 2 classes, as Fig. 1: 294,904 (contracting path and bottom) + 190,760
# (expanding path) + 18 (1x1 classifier) = 485,682.
register(
    'unet_small',
    UNet,
    dict(widths=WIDTHS_SMALL),
    family='unet',
    input_size=(64, 64, 1),
    mean=(0.5,),
    std=(0.5,),
    num_classes=2,
    min_input=16,
    reference='Ronneberger et al. 2015, Fig. 1 (widths /8: 8-16-32-64-128, padded 3x3 convs; '
    'hand count)',
    reference_params=485_682,
)
