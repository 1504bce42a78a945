"""Normaliser-free ResNets and NFNets (Brock et al. 2021a, arXiv:2101.08692; 2021b, arXiv:2102.06171).

No BatchNorm anywhere. Signal propagation is kept in check analytically instead:
  * every convolution is a Scaled Weight-Standardised conv (:class:`ScaledStdConv`), and every
    activation is multiplied by the gamma that restores unit variance for a N(0, 1) input;
  * the residual block is h_{i+1} = h_i + alpha * f_i(h_i / beta_i): beta_i = sqrt(Var[h_i]) is the
    *expected* standard deviation of the stream, tracked in closed form while building
    (Var[h_{i+1}] = Var[h_i] + alpha^2, reset to 1 + alpha^2 after each transition block, whose
    shortcut is a conv on the normalised input);
  * the branch starts at zero (a ``skip_gain`` scalar at 0 for NFNets, the last conv's ``gain``
    at 0 for NF-ResNets), so at initialisation every block is the identity (SkipInit);
  * NFNets add SE (ratio 0.5, output x2 to keep the variance) after the last conv of each branch.

Layout follows timm's ``NormFreeNet`` so its weights convert with a rename table: ``nf_resnet50``
is timm ``nf_resnet50`` (ReLU, 7x7 stem + max-pool, bottleneck ratio 0.25, gamma folded into
the conv weights as timm does), ``nfnet_f0`` ... ``nfnet_f6`` are timm ``dm_nfnet_f*`` = the
DeepMind models (GELU, 4-conv stem, widths 256/512/1536/1536, depths (1, 2, 6, 3) x (F + 1),
group width 128, an extra 3x3 conv per block, final 1x1 conv to 3072, TF "SAME" padding, gamma
in the activations).
"""

from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from ..convert import register_renames
from ..layers import (
    ClassifierHead,
    DropPath,
    SqueezeExcite,
    check_image_batch,
    make_divisible,
    max_pool,
    tap,
)
from ..layers.nf import ScaledStdConv, activation_gamma, gamma_act
from ..layers.stage import Stage, stage_blocks
from ..registry import register


class NFBlock(nn.Module):
    """Pre-activation NF bottleneck: h + alpha * skip_gain * SE(conv3(act(conv2b(act(conv2(act(conv1(act(h) * beta)))))))).

    The shortcut is the identity, or (on a shape change) 2x2 average pooling then a 1x1 conv of
    the *normalised* input act(h) * beta -- which is why the expected variance resets after it.
    """

    out_ch: int
    stride: int = 1
    alpha: float = 0.2
    beta: float = 1.0
    bottle_ratio: float = 0.5
    group_size: Optional[int] = None
    extra_conv: bool = False
    se_ratio: float = 0.0
    attn_gain: float = 2.0
    skipinit: bool = False
    act: str = 'relu'
    act_gamma: float = 1.0  # gamma applied in the activations
    conv_gamma: float = 1.0  # gamma folded into the conv weights (timm nf_resnet layout)
    padding: str = 'torch'
    std_eps: float = 1e-5
    drop_path: float = 0.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        mid = make_divisible(self.out_ch * self.bottle_ratio, 8)
        groups = mid // self.group_size if self.group_size else 1
        if self.group_size and self.group_size % 8 == 0:
            mid = self.group_size * groups
        act = gamma_act(self.act, self.act_gamma)

        def conv(name, ch, k, stride=1, g=1, gain_init=1.0):
            return ScaledStdConv(
                ch,
                k,
                stride,
                self.padding,
                g,
                gamma=self.conv_gamma,
                eps=self.std_eps,
                gain_init=gain_init,
                name=name,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )

        out = act(x) * jnp.asarray(self.beta, x.dtype)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.out_ch:
            s = out
            if self.stride != 1:
                # AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False): a ragged last window
                # averages only the pixels it covers.
                h, w = s.shape[1:3]
                s = nn.avg_pool(
                    s, (2, 2), (2, 2), ((0, h % 2), (0, w % 2)), count_include_pad=False
                )
            shortcut = conv('downsample', self.out_ch, 1)(s)
        h = conv('conv1', mid, 1)(out)
        h = conv('conv2', mid, 3, self.stride, groups)(act(h))
        if self.extra_conv:
            h = conv('conv2b', mid, 3, 1, groups)(act(h))
        h = conv('conv3', self.out_ch, 1, gain_init=1.0 if self.skipinit else 0.0)(act(h))
        if self.se_ratio:
            h = self.attn_gain * SqueezeExcite(
                rd_ratio=self.se_ratio,
                name='attn_last',
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )(h)
        h = DropPath(self.drop_path)(h, train)
        if self.skipinit:
            h = h * self.param('skip_gain', nn.initializers.zeros, (), self.param_dtype).astype(
                h.dtype
            )
        return h * jnp.asarray(self.alpha, h.dtype) + shortcut


class NFNet(nn.Module):
    """Normaliser-free ResNet / NFNet from a stage table.

    depths, channels: blocks and output width per stage (strides 1, 2, 2, 2 after a stride-4 stem).
    stem: 'deep_quad' (NFNet: 3x3 convs C/8 s2, C/4, C/2, C s2), '7x7_pool' (ResNet: 7x7 s2 conv +
      3x3 s2 max-pool) or 'cifar' (one 3x3 conv, stride 1; for 28/32-px inputs).
    gamma_in_act: multiply activations by gamma (DeepMind); otherwise fold gamma into every conv,
      the stem included, and leave the final activation plain (timm's nf_resnet layout).
    gamma_source: 'deepmind' (the published constants the pretrained weights were trained with)
      or 'computed' (exact; see :mod:`jaxcnn.layers.nf`).
    num_features: width of a final 1x1 conv before the head (0: none).
    scan_blocks: run blocks 2..n of each stage (all but the transition block) as one ``nn.scan``,
      their parameters stacked on a leading axis under ``stages_{s}/stacked/block``
      (:class:`~jaxcnn.layers.stage.Stage`; unrolled, block b is ``stages_{s}/{b}``); each
      block's beta and drop-path rate are scanned inputs. Compile time then stops growing with
      depth (nfnet_f6 has 168 blocks); the math is unchanged. ``jaxcnn.convert`` stacks timm's
      per-block weights into it.
    remat: recompute each block's activations in the backward pass instead of storing them
      (True, or a ``jax.checkpoint_policies`` name).
    """

    depths: Sequence[int]
    channels: Sequence[int] = (256, 512, 1536, 1536)
    stem: str = 'deep_quad'
    stem_width: int = 128
    bottle_ratio: float = 0.5
    group_size: Optional[int] = 128
    extra_conv: bool = True
    se_ratio: float = 0.5
    attn_gain: float = 2.0
    alpha: float = 0.2
    skipinit: bool = True
    act: str = 'gelu'
    gamma_in_act: bool = True
    gamma_source: str = 'deepmind'
    padding: str = 'same'
    std_eps: float = 1e-5
    num_features: int = 3072
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    scan_blocks: bool = False
    remat: Union[bool, str] = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        check_image_batch(x, 8, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        gamma = activation_gamma(self.act, self.gamma_source)
        act_gamma, conv_gamma = (gamma, 1.0) if self.gamma_in_act else (1.0, gamma)
        act = gamma_act(self.act, act_gamma)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def conv(name, ch, k, stride=1):
            return ScaledStdConv(
                ch, k, stride, self.padding, gamma=conv_gamma, eps=self.std_eps, name=name, **kw
            )

        c = self.stem_width
        if self.stem == 'deep_quad':
            for i, (ch, s) in enumerate(zip((c // 8, c // 4, c // 2, c), (2, 1, 1, 2))):
                if i and s > 1:  # timm's stem level: the map before the last, stride-2 conv
                    tap(x, f'stem.conv{i}')
                x = conv(f'stem_conv{i + 1}', ch, 3, s)(act(x) if i else x)
        elif self.stem == '7x7_pool':
            x = max_pool(tap(conv('stem_conv', c, 7, 2)(x), 'stem.conv'), 3, 2)
        elif self.stem == 'cifar':
            x = conv('stem_conv', c, 3, 1)(x)
        else:
            raise ValueError(f"stem must be 'deep_quad', '7x7_pool' or 'cifar', got {self.stem!r}")

        n_total = sum(self.depths)
        i, expected_var = 0, 1.0
        for s, (depth, ch) in enumerate(zip(self.depths, self.channels)):
            block_kw = dict(
                out_ch=ch,
                alpha=self.alpha,
                bottle_ratio=self.bottle_ratio,
                group_size=self.group_size,
                extra_conv=self.extra_conv,
                se_ratio=self.se_ratio,
                attn_gain=self.attn_gain,
                skipinit=self.skipinit,
                act=self.act,
                act_gamma=act_gamma,
                conv_gamma=conv_gamma,
                padding=self.padding,
                std_eps=self.std_eps,
                **kw,
            )
            fields = []
            for b in range(depth):
                fields.append(
                    dict(
                        block_kw,
                        stride=2 if (s > 0 and b == 0) else 1,
                        beta=expected_var**-0.5,
                        drop_path=self.drop_path_rate * i / n_total,
                    )
                )  # DeepMind's rule
                # a transition block's shortcut sees the normalised input: variance restarts at 1
                expected_var = (1.0 if b == 0 else expected_var) + self.alpha**2
                i += 1
            x = Stage(
                stage_blocks(NFBlock, fields),
                scan=self.scan_blocks,
                remat=self.remat,
                name=f'stages_{s}',
            )(x, train)
            if s + 1 < len(self.depths) or not self.num_features:
                tap(x, f'stages.{s}')  # the last stage's level is final_conv's, where there is one
        if self.num_features:
            x = tap(conv('final_conv', self.num_features, 1)(x), 'final_conv')
        x = act(x)
        if features_only:
            return x
        return ClassifierHead(
            self.num_classes,
            self.drop_rate,
            kernel_init=nn.initializers.normal(0.01),
            name='head',
            **kw,
        )(x, train)


# ---------------------------------------------------------------------------------------------
# Weight conversion from timm's NormFreeNet: stem.convN -> stem_convN, stages.s.b -> stages_s/b
# (which the stage helper's rule stacks into stages_s/stacked/block at index b - 1 when the stage
# is scanned), skipinit_gain -> skip_gain; ScaledStdConv ``gain`` (O, 1, 1, 1) -> (O,).
register_renames(
    'nfnet',
    [
        (r'^stem\.conv', 'stem_conv'),
        (r'^stages\.(\d+)\.(\d+)\.', r'stages_\1.\2.'),
        (r'\.downsample\.conv\.', '.downsample.'),
        (r'\.skipinit_gain$', '.skip_gain'),
    ],
)

# DeepMind NFNet variants (Brock et al. 2021b, Table 7 / nfnets/nfnet.py): depth multiplier,
# train and test resolution, dropout. Counts: timm 1.0.31 dm_nfnet_f*, 1000 classes.
NFNET_VARIANTS = {
    # name: (F index, train px, test px, dropout, params)
    'nfnet_f0': (0, 192, 256, 0.2, 71_489_284),
    'nfnet_f1': (1, 224, 320, 0.3, 132_634_256),
    'nfnet_f2': (2, 256, 352, 0.4, 193_779_228),
    'nfnet_f3': (3, 320, 416, 0.4, 254_924_200),
    'nfnet_f4': (4, 384, 512, 0.5, 316_069_172),
    'nfnet_f5': (5, 416, 544, 0.5, 377_214_144),
    'nfnet_f6': (6, 448, 576, 0.5, 438_359_116),
}
for _name, (_f, _train, _test, _drop, _count) in NFNET_VARIANTS.items():
    register(
        _name,
        NFNet,
        dict(depths=tuple(d * (_f + 1) for d in (1, 2, 6, 3)), drop_rate=_drop, scan_blocks=True),
        family='nfnet',
        input_size=(_train, _train, 3),
        reference=f'timm dm_nfnet_f{_f} (Brock et al. 2021b, Table 7; test at {_test} px)',
        reference_params=_count,
        torch_name=f'timm:dm_nfnet_f{_f}',
    )

register(
    'nf_resnet50',
    NFNet,
    dict(
        depths=(3, 4, 6, 3),
        channels=(256, 512, 1024, 2048),
        stem='7x7_pool',
        stem_width=64,
        bottle_ratio=0.25,
        group_size=None,
        extra_conv=False,
        se_ratio=0.0,
        skipinit=False,
        act='relu',
        gamma_in_act=False,
        padding='torch',
        num_features=0,
        scan_blocks=True,
    ),
    family='nfnet',
    input_size=(256, 256, 3),
    reference='timm nf_resnet50 (Brock et al. 2021a, NF-ResNet-50; test at 288 px)',
    reference_params=25_557_032,
    torch_name='timm:nf_resnet50',
)
