"""DenseNet (Huang, Liu, van der Maaten & Weinberger 2017, CVPR): every layer sees all earlier ones.

Inside a dense block, layer l receives the concatenation [x_0, x_1, ..., x_{l-1}] of the block
input and every earlier layer's output, and adds k new feature maps (the growth rate, eq. 2).
H_l is BN-ReLU-conv (§3, "Composite function"); with the bottleneck (DenseNet-B) it is
BN-ReLU-conv1x1(bn_size * k)-BN-ReLU-conv3x3(k), bn_size = 4. Between blocks a transition layer,
BN-ReLU-conv1x1-avgpool 2x2/2, compresses the channels by theta = 0.5 (DenseNet-C; -BC with the
bottleneck). After the last block: BN-ReLU, global average pool, linear classifier.

The architecture is data: the growth rate, the layers per block (``depths``, torchvision's
``block_config``), the stem and the compression. Rows:
  * ImageNet (Table 1): densenet121 / 169 / 201 (k = 32, 64-channel stem, blocks 6-12-24-16,
    6-12-32-32, 6-12-48-32) and densenet161 (k = 48, 96-channel stem, 6-12-36-24); the
    7x7/2 conv + 3x3/2 max-pool stem. Layout and counts are torchvision's, whose state-dict
    keys convert through the rename table below.
  * CIFAR (§4.2, Table 2): densenet_bc_100_k12, DenseNet-BC with L = 100, k = 12: three blocks
    of (L - 4) / 6 = 16 bottleneck layers, a 3x3 stem conv with 2k channels, compression 0.5;
    the paper gives 0.8M parameters.

``memory_efficient`` wraps each dense layer's concat-BN-ReLU-conv1x1 in ``nn.remat``, as
torchvision's flag of the same name (Pleiss et al. 2017): JAX then saves only the layer's
inputs (the earlier feature maps, which are stored anyway) and recomputes the concatenation and
BN-ReLU in the backward pass, instead of keeping one concatenated copy per layer (quadratic in
the block's depth). Outputs, gradients, BatchNorm statistics and the parameter tree are those
of the plain model (tested). Whether the compiled step uses less memory is up to XLA: on
XLA:CPU it does not (the recomputation is merged back; densenet_bc_100_k12, batch 64 at 32x32,
gradient step temp buffers 3,150 MiB with the flag vs 3,152 MiB without); GPU is not measured.

There is no residual path, so ``drop_path_rate`` is accepted only for a uniform surface;
``drop_rate`` is the classifier's dropout and ``layer_drop_rate`` torchvision's ``drop_rate``
(dropout on each dense layer's new features; the paper's 0.2 for CIFAR without augmentation).

Every dense block has layers of different input widths, so nothing can be scanned: each of the
58 (densenet121) to 98 (densenet201) dense layers is compiled on its own.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ..convert import register_renames
from ..layers import ClassifierHead, avg_pool, batch_norm, check_image_batch, conv2d, max_pool, tap
from ..registry import CIFAR10_MEAN, CIFAR10_STD, register

# torchvision initialises convolutions with kaiming_normal_ (fan-in, gain sqrt(2)).
he_normal_fan_in = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def cifar_depths(depth: int, bottleneck: bool = True, num_blocks: int = 3):
    """Layers per block of a CIFAR DenseNet with ``depth`` weight layers (§4.2): the stem conv,
    the two transition convs and the classifier are 4; each dense layer is 1 conv, or 2 with
    the bottleneck, so DenseNet-BC-100 has (100 - 4) / 6 = 16 layers per block."""
    per_layer = 2 if bottleneck else 1
    n, rem = divmod(depth - (num_blocks + 1), num_blocks * per_layer)
    if rem or n < 1:
        raise ValueError(
            f'a {num_blocks}-block DenseNet{"-BC" if bottleneck else ""} needs depth '
            f'{num_blocks + 1} + {num_blocks * per_layer} * n, got {depth}'
        )
    return (n,) * num_blocks


class DenseLayer(nn.Module):
    """H_l on the list of earlier feature maps; returns only its ``growth_rate`` new maps."""

    growth_rate: int
    bn_size: Optional[int] = 4  # None: no bottleneck (plain DenseNet, H = BN-ReLU-conv3x3)
    drop_rate: float = 0.0
    memory_efficient: bool = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=he_normal_fan_in)
        bkw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width, kernel = (
            (self.bn_size * self.growth_rate, 1) if self.bn_size else (self.growth_rate, 3)
        )

        def bottleneck(module, features):
            # torchvision's bn_function: concat -> norm1 -> relu -> conv1. The layers are built
            # here, inside the (possibly rematerialised) function, so that under nn.remat their
            # variables -- BatchNorm's running statistics included -- belong to the lifted scope
            # (modules created outside and closed over would lose their statistics updates);
            # the names, and so the parameter paths, are the same either way.
            h = batch_norm(train, name='norm1', **bkw)(jnp.concatenate(features, axis=-1))
            return conv2d(width, kernel, name='conv1', **kw)(nn.relu(h))

        if self.memory_efficient:
            # the concatenation and what follows up to conv1 are recomputed in the backward pass
            h = nn.remat(bottleneck)(self, tuple(features))
        else:
            h = bottleneck(self, tuple(features))
        if self.bn_size:
            h = nn.relu(batch_norm(train, name='norm2', **bkw)(h))
            h = conv2d(self.growth_rate, 3, name='conv2', **kw)(h)
        return nn.Dropout(self.drop_rate, deterministic=not train)(h)


class DenseBlock(nn.Module):
    num_layers: int
    growth_rate: int
    bn_size: Optional[int] = 4
    drop_rate: float = 0.0
    memory_efficient: bool = False
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        features = [x]
        for i in range(self.num_layers):
            features.append(
                DenseLayer(
                    self.growth_rate,
                    self.bn_size,
                    self.drop_rate,
                    self.memory_efficient,
                    name=f'denselayer{i + 1}',
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                )(features, train)
            )
        # the block input comes first, unchanged, then each layer's maps in order
        return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 to ``out_channels``, then 2x2/2 average pooling (§3, Pooling layers)."""

    out_channels: int
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(
            batch_norm(train, name='norm', dtype=self.dtype, param_dtype=self.param_dtype)(x)
        )
        x = conv2d(
            self.out_channels,
            1,
            name='conv',
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=he_normal_fan_in,
        )(x)
        return avg_pool(x, 2, 2)


class DenseNet(nn.Module):
    """DenseNet(-B)(-C) as data.

    growth_rate: k, maps added by each dense layer. depths: dense layers per block
      (torchvision's ``block_config``). stem: 'imagenet' (7x7/2 conv, BN-ReLU, 3x3/2 max-pool)
      or 'cifar' (one 3x3 conv). stem_width: its channels (torchvision's ``num_init_features``;
      2k for DenseNet-BC on CIFAR). bn_size: bottleneck width factor (None: no bottleneck).
      compression: theta of the transitions. ``features_only`` returns the map after the final
      BN-ReLU.
    """

    growth_rate: int = 32
    depths: Sequence[int] = (6, 12, 24, 16)
    stem: str = 'imagenet'
    stem_width: int = 64
    bn_size: Optional[int] = 4
    compression: float = 0.5
    memory_efficient: bool = False
    layer_drop_rate: float = 0.0
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # no residual paths to drop; accepted for a uniform surface
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        name = type(self).__name__
        if self.stem not in ('imagenet', 'cifar'):
            raise ValueError(f"{name}: stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if not self.depths or any(not isinstance(n, int) or n < 1 for n in self.depths):
            raise ValueError(
                f'{name}: depths must be positive layer counts per block, got {self.depths!r}'
            )
        if not 0 < self.compression <= 1:
            raise ValueError(f'{name}: compression must be in (0, 1], got {self.compression!r}')
        if self.growth_rate < 1:
            raise ValueError(f'{name}: growth_rate must be positive, got {self.growth_rate!r}')
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        reduction = 2 ** (len(self.depths) - 1) * (4 if self.stem == 'imagenet' else 1)
        check_image_batch(x, reduction, name)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        if self.stem == 'imagenet':
            x = conv2d(self.stem_width, 7, 2, name='conv0', kernel_init=he_normal_fan_in, **kw)(x)
            x = tap(nn.relu(batch_norm(train, name='norm0', **kw)(x)), 'features.norm0')
            x = max_pool(x, 3, 2)
        else:
            x = conv2d(self.stem_width, 3, 1, name='conv0', kernel_init=he_normal_fan_in, **kw)(x)
        for i, n in enumerate(self.depths):
            x = DenseBlock(
                n,
                self.growth_rate,
                self.bn_size,
                self.layer_drop_rate,
                self.memory_efficient,
                name=f'denseblock{i + 1}',
                **kw,
            )(x, train)
            if i < len(self.depths) - 1:
                # the last block's level is norm5's output, at the same reduction
                tap(x, f'features.denseblock{i + 1}')
                x = Transition(
                    int(x.shape[-1] * self.compression), name=f'transition{i + 1}', **kw
                )(x, train)
        x = tap(nn.relu(batch_norm(train, name='norm5', **kw)(x)), 'features.norm5')
        if features_only:
            return x
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


register_renames(
    'densenet',
    [
        (r'^features\.', ''),
        # the keys of torchvision's original checkpoints, 'denselayerN.norm.1' for 'norm1'
        (r'(denselayer\d+)\.(norm|conv)\.([12])\.', r'\1.\2\3.'),
        (r'^classifier\.', 'head.fc.'),
    ],
)

# Table 1 (k, stem width, layers per block). Counts: torchvision 0.29.1, 1000 classes.
_IMAGENET = dict(family='densenet', input_size=(224, 224, 3), min_input=32)
for _name, _k, _stem, _depths, _count in [
    ('densenet121', 32, 64, (6, 12, 24, 16), 7_978_856),
    ('densenet169', 32, 64, (6, 12, 32, 32), 14_149_480),
    ('densenet201', 32, 64, (6, 12, 48, 32), 20_013_928),
    ('densenet161', 48, 96, (6, 12, 36, 24), 28_681_000),
]:
    register(
        _name,
        DenseNet,
        dict(growth_rate=_k, stem_width=_stem, depths=_depths),
        reference=f'torchvision {_name} (Huang et al. 2017, Table 1)',
        reference_params=_count,
        torch_name=f'tv:{_name}',
        **_IMAGENET,
    )

# Table 2: DenseNet-BC (L = 100, k = 12), 0.8M parameters; tests/test_densenet.py recounts the
# layout by hand (769,162 at 10 classes).
register(
    'densenet_bc_100_k12',
    DenseNet,
    dict(growth_rate=12, stem='cifar', stem_width=24, depths=cifar_depths(100)),
    family='densenet',
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    num_classes=10,
    min_input=4,
    reference='Huang et al. 2017, Densely Connected Convolutional Networks, Table 2 '
    '(DenseNet-BC, L = 100, k = 12, 0.8M)',
    reference_params=0.8e6,
    params_rounding=1e5,
)
