"""The mobile inverted-bottleneck family of blocks, one module for MobileNetV2/V3, MnasNet,
FBNet and EfficientNet V1/V2.

:class:`MBConv` is one of four block kinds, chosen by ``kind``:

* ``'ds'`` depthwise-separable (MobileNetV1, Howard et al. 2017, Fig. 3; the expansion-1 first
  block of MobileNetV2/EfficientNet): depthwise kxk - BN - act - [SE] - 1x1 - BN.
* ``'ir'`` inverted residual with linear bottleneck = MBConv (Sandler et al. 2018, Table 1):
  1x1 expand by ``exp_ratio`` - BN - act - depthwise kxk (stride) - BN - act - [SE] -
  1x1 project - BN, no activation after the projection (the "linear bottleneck").
* ``'er'`` Fused-MBConv (Tan & Le 2021, Fig. 2): the expansion and depthwise convs fused into
  one full kxk conv - BN - act - [SE] - 1x1 project - BN.
* ``'cn'`` a plain conv - BN - act (EfficientNetV2's first stage, MobileNetV3's last 1x1).

With ``num_experts`` > 0 an ``'ir'`` block is a CondConv block (Yang et al. 2019, eq. 1; the
EfficientNet-B0 CondConv models): its three convolutions (1x1 expand, depthwise, 1x1
project) are :class:`jaxcnn.layers.dynamic.CondConv` mixtures of ``num_experts`` expert kernels,
all three mixed by one set of routing weights ``sigmoid(FC(GAP(x)))`` computed from the block
input by ``routing_fn`` (timm's ``CondConvResidual``); SE and BN are unchanged.

A block adds its input back (with stochastic depth on the branch) when it keeps the shape,
unless ``skip=False``; a ``'cn'`` block only when ``skip=True``. Module names follow timm's
``_efficientnet_blocks`` (``conv_pw``/``bn1``/``conv_dw``/``bn2``/``se``/``conv_pwl``/``bn3`` ...)
so its state dicts convert with a short rename table.

Squeeze-and-excitation is sized two ways, as the two lines of papers do:
  * EfficientNet / MnasNet (``se_from_exp=False``): the reduced width is ``se_ratio`` of the
    block's *input* channels, rounded to the nearest integer (Tan & Le 2019, 0.25);
  * MobileNetV3 (``se_from_exp=True``): ``se_ratio`` of the *expanded* channels, rounded to a
    multiple of 8 (Howard et al. 2019, §5.3), with ReLU inside and a hard-sigmoid gate.
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from .activations import get_act
from .conv import conv2d, depthwise_conv2d, make_divisible
from .drop import DropPath
from .dynamic import CondConv, CondConvRouting
from .norm import batch_norm
from .se import SqueezeExcite

BLOCK_KINDS = ('ds', 'ir', 'er', 'cn')


def se_channels(se_ch: int, se_ratio: float, exp_ratio: float, from_exp: bool) -> int:
    """Reduced width of a block's SE for ``se_ch`` channels at the SE (see module docstring)."""
    if from_exp:
        return make_divisible(se_ch * se_ratio, 8)
    # se_ratio is relative to the block input: rescale by the expansion, round to nearest
    return round(se_ch * (se_ratio / exp_ratio))


class MBConv(nn.Module):
    """One mobile block: ``kind`` in 'ds' | 'ir' | 'er' | 'cn' (see the module docstring)."""

    kind: str
    out_ch: int
    kernel: int = 3
    stride: int = 1
    exp_ratio: float = 1.0
    se_ratio: float = 0.0
    se_from_exp: bool = False
    se_act: Optional[str] = None  # None: the block's activation
    se_gate: str = 'sigmoid'
    act: str = 'relu'
    skip: Optional[bool] = None  # None: residual whenever the shape is kept
    padding: str = 'torch'  # 'same' for TF-trained weights (EfficientNetV2)
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9
    drop_path: float = 0.0  # may be a traced scalar in a scanned stage
    num_experts: int = 0  # > 0: CondConv 'ir' block (see the module docstring)
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.kind not in BLOCK_KINDS:
            raise ValueError(f'MBConv kind must be one of {BLOCK_KINDS}, got {self.kind!r}')
        if self.num_experts and self.kind != 'ir':
            raise ValueError(f"MBConv: CondConv experts need kind 'ir', got {self.kind!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(padding=self.padding, **kw)
        act = get_act(self.act)
        bn = lambda name: batch_norm(
            train, name=name, momentum=self.bn_momentum, epsilon=self.bn_eps, **kw
        )
        in_ch = x.shape[-1]
        mid = in_ch if self.kind in ('ds', 'cn') else make_divisible(in_ch * self.exp_ratio)

        def se(h):
            if not self.se_ratio:
                return h
            rd = se_channels(h.shape[-1], self.se_ratio, self.exp_ratio, self.se_from_exp)
            return SqueezeExcite(
                rd_channels=rd, act=self.se_act or self.act, gate=self.se_gate, name='se', **kw
            )(h)

        h = x
        if self.kind == 'cn':
            h = act(bn('bn1')(conv2d(self.out_ch, self.kernel, self.stride, name='conv', **ckw)(h)))
        elif self.kind == 'ds':
            h = act(
                bn('bn1')(
                    depthwise_conv2d(in_ch, self.kernel, self.stride, name='conv_dw', **ckw)(h)
                )
            )
            h = se(h)
            h = bn('bn2')(conv2d(self.out_ch, 1, name='conv_pw', **ckw)(h))
        elif self.kind == 'ir' and self.num_experts:
            # CondConv: one routing per block, shared by its three convolutions
            r = CondConvRouting(self.num_experts, name='routing_fn', **kw)(x)
            cc = lambda features, k, name, stride=1, groups=1: CondConv(
                features, k, stride, groups=groups, num_experts=self.num_experts, name=name, **ckw
            )
            h = act(bn('bn1')(cc(mid, 1, 'conv_pw')(h, r)))
            h = act(bn('bn2')(cc(mid, self.kernel, 'conv_dw', self.stride, mid)(h, r)))
            h = se(h)
            h = bn('bn3')(cc(self.out_ch, 1, 'conv_pwl')(h, r))
        elif self.kind == 'ir':
            h = act(bn('bn1')(conv2d(mid, 1, name='conv_pw', **ckw)(h)))
            h = act(
                bn('bn2')(depthwise_conv2d(mid, self.kernel, self.stride, name='conv_dw', **ckw)(h))
            )
            h = se(h)
            h = bn('bn3')(conv2d(self.out_ch, 1, name='conv_pwl', **ckw)(h))
        else:  # 'er': Fused-MBConv
            h = act(bn('bn1')(conv2d(mid, self.kernel, self.stride, name='conv_exp', **ckw)(h)))
            h = se(h)
            h = bn('bn2')(conv2d(self.out_ch, 1, name='conv_pwl', **ckw)(h))

        same_shape = self.stride == 1 and in_ch == self.out_ch
        residual = same_shape and (self.skip if self.kind == 'cn' else self.skip is not False)
        if not residual:
            return h
        return DropPath(self.drop_path)(h, train) + x
