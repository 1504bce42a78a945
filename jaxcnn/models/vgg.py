"""VGG (Simonyan & Zisserman 2015, Table 1): stacks of 3x3 convolutions between 2x2 max-pools.

Every convolution is 3x3, stride 1, padding 1 (+ BatchNorm in the ``_bn`` variants, which
the paper predates); each 2x2/2 max-pool halves the map and the next stage doubles the
channels, up to 512. Configurations A, B, D and E are rows of convolutions per stage; one
builder, :class:`VGG`, reads them. The head is torchvision's: adaptive average pool to 7x7,
(C, H, W) flatten, fc6-ReLU-Dropout-fc7-ReLU-Dropout-fc8.

Module names mirror torchvision's ``features.<index>`` (``features_<index>``), so the one
rename table below converts every configuration.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ..convert import register_renames
from ..layers import (
    ClassifierHead,
    adaptive_avg_pool,
    batch_norm,
    check_image_batch,
    conv2d,
    max_pool,
    tap,
)
from ..registry import register

WIDTHS = (64, 128, 256, 512, 512)
# Table 1: convolutions per stage of configurations A (11 weight layers), B (13), D (16), E (19).
CONFIGS = {'A': [1, 1, 2, 2, 2], 'B': [2, 2, 2, 2, 2], 'D': [2, 2, 3, 3, 3], 'E': [2, 2, 4, 4, 4]}


class VGG(nn.Module):
    """``num_classes=0`` returns the fc7 features; ``features_only`` the last pooled conv map."""

    depths: Sequence[int] = (2, 2, 3, 3, 3)
    widths: Sequence[int] = WIDTHS
    use_bn: bool = False
    mlp_width: int = 4096
    num_classes: int = 1000
    drop_rate: float = 0.5
    drop_path_rate: float = 0.0  # no residual blocks to drop; accepted for a uniform surface
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        check_image_batch(x, 2 ** len(self.depths), type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        i = 0  # index in torchvision's ``features`` Sequential: conv, [bn], relu ..., pool
        for n, width in zip(self.depths, self.widths):
            for _ in range(n):
                x = conv2d(width, 3, use_bias=True, name=f'features_{i}', **kw)(x)
                if self.use_bn:
                    x = batch_norm(train, name=f'features_{i + 1}', **kw)(x)
                x = nn.relu(x)
                i += 3 if self.use_bn else 2
            # feature levels (timm's): the ReLU before each max-pool, and the last max-pool
            tap(x, f'features.{i - 1}')
            x = max_pool(x, 2, 2, padding='valid')
            i += 1
        tap(x, f'features.{i - 1}')
        if features_only:
            return x
        x = adaptive_avg_pool(x, 7)
        x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # PyTorch's (C, H, W) flatten
        init = nn.initializers.normal(0.01)  # torchvision's Linear init for VGG
        fc = lambda name, h: nn.relu(nn.Dense(self.mlp_width, kernel_init=init, name=name, **kw)(h))
        x = fc('fc7', nn.Dropout(self.drop_rate, deterministic=not train)(fc('fc6', x)))
        # the dropout after fc7 is the head's
        return ClassifierHead(
            self.num_classes, self.drop_rate, kernel_init=init, name='head', **kw
        )(x, train)


register_renames(
    'vgg',
    [
        (r'^features\.(\d+)\.', r'features_\1.'),
        (r'^classifier\.0\.', 'fc6.'),
        (r'^classifier\.3\.', 'fc7.'),
        (r'^classifier\.6\.', 'head.fc.'),
        # timm's layout: fc6 and fc7 as convolutions (7x7 over the pooled map, then 1x1)
        (r'^pre_logits\.fc1\.', 'fc6.'),
        (r'^pre_logits\.fc2\.', 'fc7.'),
    ],
)

# Counts: torchvision 0.29.1, 1000 classes.
for _depth, _config, _count, _count_bn in [
    (11, 'A', 132_863_336, 132_868_840),
    (13, 'B', 133_047_848, 133_053_736),
    (16, 'D', 138_357_544, 138_365_992),
    (19, 'E', 143_667_240, 143_678_248),
]:
    for _bn, _n in [(False, _count), (True, _count_bn)]:
        _name = f'vgg{_depth}' + ('_bn' if _bn else '')
        register(
            _name,
            VGG,
            dict(depths=tuple(CONFIGS[_config]), use_bn=_bn),
            family='vgg',
            input_size=(224, 224, 3),
            min_input=32,
            reference=f'torchvision {_name} (Simonyan & Zisserman 2015, Table 1, config {_config})',
            reference_params=_n,
            torch_name=f'tv:{_name}',
        )
