"""SqueezeNet 1.0 and 1.1 (Iandola et al. 2016) and the paper's bypass variants (§6).

A Fire module squeezes its input with s1x1 1x1 filters, then expands it with e1x1 1x1 and
e3x3 3x3 filters side by side and concatenates them (§3.2, every convolution ReLU-activated).
The network is a table of Fire modules (Table 1): conv1, eight Fire modules fire2..fire9,
max-pools (3x3, stride 2, rounded up as Caffe does) after the listed layers, and no fully
connected layer: the classifier is dropout, a 1x1 convolution to one map per class (conv10),
ReLU, and global average pooling. The classifier is the head: a Dense applied per pixel
(= the 1x1 convolution) named ``head/fc``.

  * ``squeezenet1_0``: Table 1, as torchvision builds it: conv1 96 7x7/2, pools after conv1,
    fire4 and fire8.
  * ``squeezenet1_1``: DeepScale's v1.1 release (torchvision ``squeezenet1_1``): conv1 64
    3x3/2, pools after conv1, fire3 and fire5 (2.4x less computation, same accuracy).
  * ``squeezenet1_0_simple_bypass``: §6 and Fig. 2 (middle): identity bypass around the Fire
    modules whose input and output widths agree (fire3, 5, 7, 9): the input to fire4 is
    fire2's output + fire3's output. No parameters are added.
  * ``squeezenet1_0_complex_bypass``: Fig. 2 (right): the same identities, plus a 1x1
    convolution bypass (with bias, no ReLU) around the remaining Fire modules (fire2, 4, 6, 8)
    to match their output width.

Model sizes in the paper (Tables 2 and 3) are 32-bit weights in MiB (2^20 bytes):
1,248,424 x 4 B = 4.76 MiB is Table 2's and Table 3's "4.8MB" for vanilla SqueezeNet and
for the simple bypass. Table 3 lists 7.7MB for the complex bypass; the layout of Fig. 2
(right) has 1,589,672 parameters (6.06 MiB, 6.36 MB), and no reading of the figure we tried
gives 7.7 MB, so that variant is registered with its hand count (tests/test_squeezenet.py).

Module names mirror torchvision's ``features.<index>`` (``features_<index>``, pools and
ReLUs counted), so one rename table converts both versions; :func:`layer_names` maps the
paper's layer names (conv1, fire2..fire9) to them.
"""

from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from ..convert import register_renames
from ..layers import ceil_max_pool, check_image_batch, conv2d, global_avg_pool, tap
from ..registry import register

# Table 1 of the paper (and DeepScale's v1.1): conv1 (filters, kernel, stride), Fire modules
# fire2..fire9 as (s1x1, e1x1, e3x3), and the layers followed by a 3x3/2 max-pool.
SQUEEZENET_1_0 = dict(
    conv1=(96, 7, 2),
    fires=(
        (16, 64, 64),
        (16, 64, 64),
        (32, 128, 128),
        (32, 128, 128),
        (48, 192, 192),
        (48, 192, 192),
        (64, 256, 256),
        (64, 256, 256),
    ),
    pools_after=('conv1', 'fire4', 'fire8'),
)
SQUEEZENET_1_1 = dict(
    conv1=(64, 3, 2), fires=SQUEEZENET_1_0['fires'], pools_after=('conv1', 'fire3', 'fire5')
)

# torchvision initialises every convolution with kaiming_uniform_ (gain sqrt(2), fan-in) and
# the class-map convolution with N(0, 0.01); biases start at zero.
_KAIMING_UNIFORM = nn.initializers.he_uniform()
_HEAD_INIT = nn.initializers.normal(0.01)


def layer_names(table: dict) -> Dict[str, str]:
    """Paper layer name (conv1, fire2, ...) -> jaxcnn module name (``features_<index>``)."""
    names, i = {'conv1': 'features_0'}, 2  # conv1, ReLU
    i += 'conv1' in table['pools_after']
    for k in range(2, 2 + len(table['fires'])):
        names[f'fire{k}'] = f'features_{i}'
        i += 1 + (f'fire{k}' in table['pools_after'])
    return names


def _pooled(size: int) -> int:
    # PyTorch's ceil-mode 3x3/2 output size
    return -(-(size - 3) // 2) + 1


def min_input(table: dict) -> int:
    """Smallest square input for which every max-pool still sees a full 3x3 window."""
    _, k, s = table['conv1']
    size = 1
    while True:
        h = (size - k) // s + 1 if size >= k else 0
        ok = h >= 3
        for _ in range(len(table['pools_after']) - 1):
            h = _pooled(h) if ok else 0
            ok = h >= 3
        if ok:
            return size
        size += 1


class Fire(nn.Module):
    """squeeze (1x1) -> [expand1x1, expand3x3] concatenated; every convolution ReLU-activated.

    bypass: 'none'; 'identity' (§6 simple bypass: add the input); 'conv' (§6 complex bypass:
    add a 1x1 convolution of the input with as many filters as the module outputs).
    """

    squeeze: int
    expand1x1: int
    expand3x3: int
    bypass: str = 'none'
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(
            use_bias=True,
            kernel_init=_KAIMING_UNIFORM,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        s = nn.relu(conv2d(self.squeeze, 1, name='squeeze', **kw)(x))
        y = jnp.concatenate(
            [
                nn.relu(conv2d(self.expand1x1, 1, name='expand1x1', **kw)(s)),
                nn.relu(conv2d(self.expand3x3, 3, name='expand3x3', **kw)(s)),
            ],
            axis=-1,
        )
        if self.bypass == 'identity':
            y = y + x
        elif self.bypass == 'conv':
            y = y + conv2d(y.shape[-1], 1, name='bypass', **kw)(x)
        elif self.bypass != 'none':
            raise ValueError(f"bypass must be 'none', 'identity' or 'conv', got {self.bypass!r}")
        return y


class ClassMapHead(nn.Module):
    """dropout -> per-pixel linear map to one map per class (= conv10, 1x1) -> ReLU -> global
    average. ``num_classes=0`` returns the globally averaged input features."""

    num_classes: int
    drop_rate: float = 0.5
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.num_classes:
            x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
            x = nn.relu(
                nn.Dense(
                    self.num_classes,
                    kernel_init=_HEAD_INIT,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name='fc',
                )(x)
            )
        return global_avg_pool(x)


class SqueezeNet(nn.Module):
    """conv1 -> Fire modules with max-pools between (the table) -> class-map head.

    bypass: 'none', 'simple' (identity around Fire modules whose input and output widths
      agree) or 'complex' (those, plus a 1x1 convolution around the others).
    ``num_classes=0`` returns the globally averaged output of the last Fire module,
    ``features_only`` that map unpooled.
    """

    conv1: Tuple[int, int, int] = SQUEEZENET_1_0['conv1']
    fires: Sequence[Tuple[int, int, int]] = SQUEEZENET_1_0['fires']
    pools_after: Sequence[str] = SQUEEZENET_1_0['pools_after']
    bypass: str = 'none'
    num_classes: int = 1000
    drop_rate: float = 0.5
    drop_path_rate: float = 0.0  # no residual blocks to drop; accepted for a uniform surface
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        if self.bypass not in ('none', 'simple', 'complex'):
            raise ValueError(f"bypass must be 'none', 'simple' or 'complex', got {self.bypass!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        table = dict(
            conv1=tuple(self.conv1), fires=tuple(self.fires), pools_after=tuple(self.pools_after)
        )
        check_image_batch(x, min_input(table), type(self).__name__)
        names = layer_names(table)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        width, kernel, stride = self.conv1
        x = nn.relu(
            conv2d(
                width,
                kernel,
                stride,
                padding='valid',
                use_bias=True,
                kernel_init=_KAIMING_UNIFORM,
                name=names['conv1'],
                **kw,
            )(x)
        )
        # feature levels: the map before each max-pool, and the last Fire module's
        if 'conv1' in self.pools_after:
            x = ceil_max_pool(tap(x, 'features.1'), 3, 2)  # conv1's ReLU
        for k, (s, e1, e3) in enumerate(self.fires, start=2):
            same = x.shape[-1] == e1 + e3
            bypass = (
                'identity'
                if same and self.bypass != 'none'
                else 'conv'
                if not same and self.bypass == 'complex'
                else 'none'
            )
            x = Fire(s, e1, e3, bypass, name=names[f'fire{k}'], **kw)(x)
            if f'fire{k}' in self.pools_after or k == len(self.fires) + 1:
                tap(x, names[f'fire{k}'].replace('_', '.'))
            if f'fire{k}' in self.pools_after:
                x = ceil_max_pool(x, 3, 2)
        if features_only:
            return x
        return ClassMapHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


register_renames(
    'squeezenet',
    [
        (r'^features\.(\d+)\.', r'features_\1.'),
        (r'^classifier\.1\.', 'head.fc.'),
    ],
)

_IMAGENET = dict(family='squeezenet', input_size=(224, 224, 3))
register(
    'squeezenet1_0',
    SqueezeNet,
    dict(**SQUEEZENET_1_0),
    min_input=min_input(SQUEEZENET_1_0),
    reference='torchvision squeezenet1_0 (Iandola et al. 2016, Table 1)',
    reference_params=1_248_424,
    torch_name='tv:squeezenet1_0',
    **_IMAGENET,
)
register(
    'squeezenet1_1',
    SqueezeNet,
    dict(**SQUEEZENET_1_1),
    min_input=min_input(SQUEEZENET_1_1),
    reference='torchvision squeezenet1_1 (DeepScale SqueezeNet v1.1: conv1 64 3x3/2, '
    'pools after conv1, fire3, fire5)',
    reference_params=1_235_496,
    torch_name='tv:squeezenet1_1',
    **_IMAGENET,
)
# Table 3: simple bypass 4.8MB (32-bit, MiB) = vanilla's 1,248,424 parameters.
register(
    'squeezenet1_0_simple_bypass',
    SqueezeNet,
    dict(**SQUEEZENET_1_0, bypass='simple'),
    min_input=min_input(SQUEEZENET_1_0),
    reference='Iandola et al. 2016, §6, Fig. 2 (middle) and Table 3 (identity bypass around '
    'fire3/5/7/9; 4.8MB = vanilla SqueezeNet\'s 1,248,424 parameters)',
    reference_params=1_248_424,
    **_IMAGENET,
)
# Hand count: vanilla + 1x1 bypass convolutions (weights + biases) around fire2 (96 -> 128),
# fire4 (128 -> 256), fire6 (256 -> 384), fire8 (384 -> 512):
# 1,248,424 + 12,416 + 33,024 + 98,688 + 197,120 = 1,589,672. Table 3's 7.7MB is not
# reproduced by this layout (see the module docstring).
register(
    'squeezenet1_0_complex_bypass',
    SqueezeNet,
    dict(**SQUEEZENET_1_0, bypass='complex'),
    min_input=min_input(SQUEEZENET_1_0),
    reference='Iandola et al. 2016, §6 and Fig. 2 (right): 1x1-conv bypass around fire2/4/6/8, '
    'identity around fire3/5/7/9 (hand count; Table 3\'s 7.7MB not reproduced)',
    reference_params=1_589_672,
    **_IMAGENET,
)
