"""GoogLeNet (Szegedy et al. 2015) and Inception-v3 (Szegedy et al. 2016) from one builder.

Both networks are a table of steps read by :class:`Inception`:
  * :class:`Conv`: a conv-BN-ReLU unit (:class:`~jaxcnn.layers.conv_bn.ConvBnAct`), named as
    torchvision names it;
  * :class:`Pool`: max or average pooling (ceil mode for GoogLeNet's Caffe-style pools);
  * :class:`Concat`: an Inception module, branches of steps run on the same input and
    concatenated along channels. 1x1 convolutions reduce the channels before the expensive
    3x3/5x5 (GoogLeNet) or factorised 1x7/7x1 (Inception-v3) ones. A nameless Concat inside a
    branch is Inception-v3's split of one map into parallel 1x3 and 3x1 convolutions.

Auxiliary classifiers tap the named modules listed in ``aux_taps``: they run only in train
mode, where the model returns ``(logits, [aux_logits, ...])``; the trainer's
:func:`jaxcnn.optim.classification_loss` adds their cross-entropy with weight 0.3. Inference
returns the logits alone. (They are also built during ``init``, so the parameters exist
whatever mode initialises the model.) ``aux_logits=False`` removes them.

torchvision's layouts, kept so that weights convert:
  * GoogLeNet's "5x5" branch uses a 3x3 convolution (pytorch/vision#906, kept for its
    weights); ``googlenet_layers(kernel_5x5=5)`` gives the paper's 5x5. Its last max-pool is
    2x2/2 (the paper's Table 1: 3x3/2; same 7x7 map at 224 px). BatchNorm after every
    convolution (eps 1e-3) is torchvision's, the paper predates it.
  * ``transform_input`` re-normalises ImageNet-normalised images to the [-1, 1] range of
    torchvision's pretrained (TensorFlow-ported) weights, as torchvision does when loading them.
"""

import functools
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from ..convert import register_renames
from ..layers import (
    ClassifierHead,
    adaptive_avg_pool,
    avg_pool,
    ceil_max_pool,
    ceil_mode_padding,
    check_image_batch,
    global_avg_pool,
    make_divisible,
    max_pool,
    resolve_padding,
    tap,
)
from ..layers.conv_bn import ConvBnAct
from ..registry import IMAGENET_MEAN, IMAGENET_STD, register


class Conv(NamedTuple):
    """A conv-BN-ReLU unit; ``padding`` 'torch' keeps the size at stride 1."""

    name: str
    features: int
    kernel: Any = 1  # int or (kh, kw)
    stride: int = 1
    padding: Any = 'torch'


class Pool(NamedTuple):
    kind: str  # 'max' or 'avg' (average counts padded zeros, as PyTorch)
    window: int = 3
    stride: int = 1
    padding: Any = 'torch'
    ceil: bool = False  # PyTorch's ceil_mode (unpadded pools only)


class Concat(NamedTuple):
    """Branches (each a sequence of steps) on one input, concatenated along channels."""

    name: Optional[str]  # a module scope; None keeps the parent's
    branches: Tuple[Tuple[Any, ...], ...]


def split(*convs: Conv) -> Concat:
    """Parallel single convolutions on one map (Inception-v3's 1x3 / 3x1 pairs)."""
    return Concat(None, tuple((c,) for c in convs))


# ---------------------------------------------------------------------------------------------
# GoogLeNet: Szegedy et al. 2015, Table 1 (stem, nine Inception modules, two auxiliary heads)


def googlenet_module(name, c1, c3_reduce, c3, c5_reduce, c5, pool_proj, kernel_5x5=3):
    """One Table 1 row: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj."""
    return Concat(
        name,
        (
            (Conv('branch1', c1),),
            (Conv('branch2_0', c3_reduce), Conv('branch2_1', c3, 3)),
            (Conv('branch3_0', c5_reduce), Conv('branch3_1', c5, kernel_5x5)),
            (Pool('max', 3, 1), Conv('branch4_1', pool_proj)),
        ),
    )


GOOGLENET_MODULES = {
    'inception3a': (64, 96, 128, 16, 32, 32),
    'inception3b': (128, 128, 192, 32, 96, 64),
    'inception4a': (192, 96, 208, 16, 48, 64),
    'inception4b': (160, 112, 224, 24, 64, 64),
    'inception4c': (128, 128, 256, 24, 64, 64),
    'inception4d': (112, 144, 288, 32, 64, 64),
    'inception4e': (256, 160, 320, 32, 128, 128),
    'inception5a': (256, 160, 320, 32, 128, 128),
    'inception5b': (384, 192, 384, 48, 128, 128),
}


def googlenet_layers(kernel_5x5: int = 3):
    """GoogLeNet's table; ``kernel_5x5=5`` is the paper's, 3 torchvision's (and its weights')."""
    m = lambda name: googlenet_module(name, *GOOGLENET_MODULES[name], kernel_5x5=kernel_5x5)
    return (
        Conv('conv1', 64, 7, 2),
        Pool('max', 3, 2, 0, ceil=True),
        Conv('conv2', 64, 1),
        Conv('conv3', 192, 3),
        Pool('max', 3, 2, 0, ceil=True),
        m('inception3a'),
        m('inception3b'),
        Pool('max', 3, 2, 0, ceil=True),
        m('inception4a'),
        m('inception4b'),
        m('inception4c'),
        m('inception4d'),
        m('inception4e'),
        Pool('max', 2, 2, 0, ceil=True),
        m('inception5a'),
        m('inception5b'),
    )


GOOGLENET = googlenet_layers()


# ---------------------------------------------------------------------------------------------
# Inception-v3: Szegedy et al. 2016, Table 1 and Figs. 5-7, 10 (torchvision's module names)


def inception_a(name, pool_features):
    """35x35 module (Fig. 5): the 5x5 and a 5x5 factorised into two 3x3."""
    return Concat(
        name,
        (
            (Conv('branch1x1', 64),),
            (Conv('branch5x5_1', 48), Conv('branch5x5_2', 64, 5)),
            (
                Conv('branch3x3dbl_1', 64),
                Conv('branch3x3dbl_2', 96, 3),
                Conv('branch3x3dbl_3', 96, 3),
            ),
            (Pool('avg', 3, 1), Conv('branch_pool', pool_features)),
        ),
    )


def inception_b(name):
    """Grid reduction 35 -> 17 (Fig. 10): stride-2 convolutions beside a stride-2 pool."""
    return Concat(
        name,
        (
            (Conv('branch3x3', 384, 3, 2, 'valid'),),
            (
                Conv('branch3x3dbl_1', 64),
                Conv('branch3x3dbl_2', 96, 3),
                Conv('branch3x3dbl_3', 96, 3, 2, 'valid'),
            ),
            (Pool('max', 3, 2, 'valid'),),
        ),
    )


def inception_c(name, c7):
    """17x17 module (Fig. 6): 7x7 factorised into 1x7 and 7x1."""
    return Concat(
        name,
        (
            (Conv('branch1x1', 192),),
            (
                Conv('branch7x7_1', c7),
                Conv('branch7x7_2', c7, (1, 7)),
                Conv('branch7x7_3', 192, (7, 1)),
            ),
            (
                Conv('branch7x7dbl_1', c7),
                Conv('branch7x7dbl_2', c7, (7, 1)),
                Conv('branch7x7dbl_3', c7, (1, 7)),
                Conv('branch7x7dbl_4', c7, (7, 1)),
                Conv('branch7x7dbl_5', 192, (1, 7)),
            ),
            (Pool('avg', 3, 1), Conv('branch_pool', 192)),
        ),
    )


def inception_d(name):
    """Grid reduction 17 -> 8."""
    return Concat(
        name,
        (
            (Conv('branch3x3_1', 192), Conv('branch3x3_2', 320, 3, 2, 'valid')),
            (
                Conv('branch7x7x3_1', 192),
                Conv('branch7x7x3_2', 192, (1, 7)),
                Conv('branch7x7x3_3', 192, (7, 1)),
                Conv('branch7x7x3_4', 192, 3, 2, 'valid'),
            ),
            (Pool('max', 3, 2, 'valid'),),
        ),
    )


def inception_e(name):
    """8x8 module (Fig. 7): expanded filter bank, 3x3 outputs split into 1x3 and 3x1."""
    return Concat(
        name,
        (
            (Conv('branch1x1', 320),),
            (
                Conv('branch3x3_1', 384),
                split(Conv('branch3x3_2a', 384, (1, 3)), Conv('branch3x3_2b', 384, (3, 1))),
            ),
            (
                Conv('branch3x3dbl_1', 448),
                Conv('branch3x3dbl_2', 384, 3),
                split(Conv('branch3x3dbl_3a', 384, (1, 3)), Conv('branch3x3dbl_3b', 384, (3, 1))),
            ),
            (Pool('avg', 3, 1), Conv('branch_pool', 192)),
        ),
    )


INCEPTION_V3 = (
    Conv('Conv2d_1a_3x3', 32, 3, 2, 'valid'),
    Conv('Conv2d_2a_3x3', 32, 3, 1, 'valid'),
    Conv('Conv2d_2b_3x3', 64, 3),
    Pool('max', 3, 2, 'valid'),
    Conv('Conv2d_3b_1x1', 80),
    Conv('Conv2d_4a_3x3', 192, 3, 1, 'valid'),
    Pool('max', 3, 2, 'valid'),
    inception_a('Mixed_5b', 32),
    inception_a('Mixed_5c', 64),
    inception_a('Mixed_5d', 64),
    inception_b('Mixed_6a'),
    inception_c('Mixed_6b', 128),
    inception_c('Mixed_6c', 160),
    inception_c('Mixed_6d', 160),
    inception_c('Mixed_6e', 192),
    inception_d('Mixed_7a'),
    inception_e('Mixed_7b'),
    inception_e('Mixed_7c'),
)


# ---------------------------------------------------------------------------------------------
# Map sizes of a table, so the smallest accepted input is derived rather than stated


def _step_size(step, size: int) -> int:
    """Output side of ``step`` for a square map of side ``size`` (0 when it does not fit)."""
    if isinstance(step, Concat):
        return min(output_size(branch, size) for branch in step.branches)
    k = step.window if isinstance(step, Pool) else step.kernel
    kernel = tuple(k) if isinstance(k, (tuple, list)) else (k, k)
    if isinstance(step, Pool) and step.ceil:
        pads = [ceil_mode_padding(size, k, step.stride) for k in kernel]
    else:
        pads = resolve_padding(step.padding, kernel)
        pads = [(0, 0)] * 2 if pads == 'VALID' else pads
    return min(
        (size + lo + hi - k) // step.stride + 1 if size + lo + hi >= k else 0
        for k, (lo, hi) in zip(kernel, pads)
    )


def output_size(layers, size: int) -> int:
    """Side of the final map of ``layers`` for a ``size`` x ``size`` input (0: too small)."""
    for step in layers:
        size = _step_size(step, size) if size > 0 else 0
    return size


@functools.lru_cache(maxsize=None)
def min_input_size(layers) -> int:
    """Smallest square input every step of ``layers`` can read."""
    return next(s for s in range(1, 1024) if output_size(layers, s) > 0)


# ---------------------------------------------------------------------------------------------
# The builder


def _run(steps, x, train: bool, unit):
    """Apply a sequence of steps; ``unit(conv_step)`` builds a conv-BN-ReLU module."""
    for step in steps:
        if isinstance(step, Conv):
            x = unit(step)(x, train)
        elif isinstance(step, Pool):
            if step.kind == 'max':
                x = (
                    ceil_max_pool(x, step.window, step.stride)
                    if step.ceil
                    else max_pool(x, step.window, step.stride, step.padding)
                )
            else:
                x = avg_pool(x, step.window, step.stride, step.padding)
        elif step.name is None:
            x = _concat(step.branches, x, train, unit)
        else:
            x = InceptionModule(step.branches, unit, name=step.name)(x, train)
    return x


def _concat(branches, x, train: bool, unit):
    return jnp.concatenate([_run(b, x, train, unit) for b in branches], axis=-1)


class InceptionModule(nn.Module):
    """One named :class:`Concat`: its branches' outputs, concatenated along channels.
    ``unit`` builds the conv-BN-ReLU modules (torchvision's ``conv_block`` argument)."""

    branches: Tuple[Tuple[Any, ...], ...]
    unit: Any

    @nn.compact
    def __call__(self, x, train: bool = False):
        return _concat(self.branches, x, train, self.unit)


class GoogLeNetAux(nn.Module):
    """Szegedy et al. 2015, §5: average pool to 4x4 (torchvision: adaptive, so any map
    works), 1x1 conv with 128 filters, fc 1024 + ReLU, dropout 0.7, linear classifier."""

    num_classes: int
    unit: Any
    width: float = 1.0
    drop_rate: float = 0.7
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(
            dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.normal(0.01)
        )  # torchvision's GoogLeNet init
        width = lambda c: make_divisible(c * self.width, 1)
        x = self.unit(Conv('conv', width(128)))(adaptive_avg_pool(x, 4), train)
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # PyTorch's (C, H, W) flatten
        x = nn.relu(nn.Dense(width(1024), name='fc1', **kw)(x))
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name='fc2', **kw)(x)


class InceptionV3Aux(nn.Module):
    """Szegedy et al. 2016, §4 (torchvision's ``AuxLogits``): 5x5/3 average pool (17x17 ->
    5x5), 1x1 conv 128, 5x5 conv 768, global average, linear classifier.

    Below 299 px torchvision's head has no room for its unpadded 5x5 conv and fails; here a
    map smaller than the pool window is pooled whole, and a pooled map smaller than 5x5 is
    zero-padded to 5x5 for the conv, so the head trains at any input the trunk accepts
    (identical to torchvision wherever torchvision runs, i.e. a tapped map of 17x17 or more).
    """

    num_classes: int
    unit: Any
    width: float = 1.0
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = lambda c: make_divisible(c * self.width, 1)
        x = avg_pool(x, (min(5, x.shape[1]), min(5, x.shape[2])), 3)
        x = self.unit(Conv('conv0', width(128)))(x, train)
        pads = tuple(
            ((5 - n) // 2, 5 - n - (5 - n) // 2) if n < 5 else (0, 0) for n in x.shape[1:3]
        )
        # torchvision initialises this conv and the classifier with std 0.01 and 0.001
        x = self.unit(Conv('conv1', width(768), 5, padding=pads), 0.01)(x, train)
        return nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(0.001),
            name='fc',
        )(global_avg_pool(x))


class Inception(nn.Module):
    """A table of conv units, pools and Inception modules -> global average -> dropout -> fc.

    aux_taps: (module name, auxiliary head name) pairs; aux_head picks the head's design
      ('googlenet' or 'inception_v3'); aux_logits=False builds none.
    width: multiplies every hidden width (small models for smoke tests); 1.0 is the reference.
    init_std: std of the normal init of convolutions and linears (torchvision: 0.01 for
      GoogLeNet, 0.1 for Inception-v3).
    ``num_classes=0`` returns pooled features, ``features_only`` the last map; neither runs
    the auxiliary heads.
    """

    layers: Sequence[Any] = GOOGLENET
    aux_taps: Sequence[Tuple[str, str]] = (('inception4a', 'aux1'), ('inception4d', 'aux2'))
    aux_head: str = 'googlenet'
    aux_logits: bool = True
    aux_drop_rate: float = 0.7  # dropout inside GoogLeNet's heads (torchvision's dropout_aux)
    width: float = 1.0
    bn_eps: float = 1e-3
    init_std: float = 0.01
    transform_input: bool = False
    num_classes: int = 1000
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0  # no residual blocks to drop; accepted for a uniform surface
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, min_input_size(self.layers), type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        if self.transform_input:
            if x.shape[-1] != 3:
                raise ValueError(
                    f'transform_input re-normalises RGB images; got {x.shape[-1]} channels'
                )
            # ImageNet mean/std normalised -> (x - 0.5) / 0.5 normalised, per RGB channel
            mean, std = jnp.asarray(IMAGENET_MEAN), jnp.asarray(IMAGENET_STD)
            x = (x * (std / 0.5) + (mean - 0.5) / 0.5).astype(x.dtype)

        def unit(step: Conv, init_std: float = self.init_std):
            return ConvBnAct(
                make_divisible(step.features * self.width, 1),
                step.kernel,
                step.stride,
                step.padding,
                eps=self.bn_eps,
                kernel_init=nn.initializers.normal(init_std),
                name=step.name,
                **kw,
            )

        def aux_head(name):
            if self.aux_head == 'googlenet':
                return GoogLeNetAux(
                    self.num_classes, unit, self.width, self.aux_drop_rate, name=name, **kw
                )
            if self.aux_head == 'inception_v3':
                return InceptionV3Aux(self.num_classes, unit, self.width, name=name, **kw)
            raise ValueError(
                f"aux_head must be 'googlenet' or 'inception_v3', got {self.aux_head!r}"
            )

        # auxiliary heads: in train mode, and at init so their parameters always exist
        with_aux = (
            self.aux_logits
            and self.num_classes > 0
            and not features_only
            and (train or self.is_initializing())
        )

        def subsamples(step):  # a strided conv or pool, or an Inception module with one
            inner = [s for branch in getattr(step, 'branches', ()) for s in branch]
            return any(getattr(s, 'stride', 1) > 1 for s in (step, *inner))

        taps, aux = dict(self.aux_taps), []
        for i, step in enumerate(self.layers):
            x = _run((step,), x, train, unit)
            # feature levels: the map before each subsampling step, and the last
            if i + 1 == len(self.layers) or subsamples(self.layers[i + 1]):
                tap(x, step.name)
            if with_aux and getattr(step, 'name', None) in taps:
                aux.append(aux_head(taps[step.name])(x, train))
        if features_only:
            return x
        logits = ClassifierHead(
            self.num_classes,
            self.drop_rate,
            name='head',
            kernel_init=nn.initializers.normal(self.init_std),
            **kw,
        )(x, train)
        return (logits, aux) if train and aux else logits


# torchvision keys: '<module>.branch2.0.conv.weight' (GoogLeNet's Sequential branches) and
# 'fc.*'; Inception-v3's names are used as they are.
register_renames(
    'inception',
    [
        (r'\.branch(\d)\.(\d)\.', r'.branch\1_\2.'),
        (r'^fc\.', 'head.fc.'),
    ],
)

# Counts: torchvision 0.29.1 with its default auxiliary heads (aux_logits=True), 1000 classes.
register(
    'googlenet',
    Inception,
    dict(layers=GOOGLENET, drop_rate=0.2, init_std=0.01),
    family='inception',
    input_size=(224, 224, 3),
    min_input=min_input_size(GOOGLENET),
    reference='torchvision googlenet (Szegedy et al. 2015, Table 1) with its two '
    'auxiliary classifiers; 6,624,904 with aux_logits=False',
    reference_params=13_004_888,
    torch_name='tv:googlenet',
)
register(
    'inception_v3',
    Inception,
    dict(
        layers=INCEPTION_V3,
        aux_taps=(('Mixed_6e', 'AuxLogits'),),
        aux_head='inception_v3',
        drop_rate=0.5,
        init_std=0.1,
    ),
    family='inception',
    input_size=(299, 299, 3),
    min_input=min_input_size(INCEPTION_V3),
    reference='torchvision inception_v3 (Szegedy et al. 2016, Table 1) with its auxiliary '
    'classifier; 23,834,568 with aux_logits=False (timm inception_v3)',
    reference_params=27_161_264,
    torch_name='tv:inception_v3',
)
