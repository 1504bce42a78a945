"""LeNet-5 (LeCun, Bottou, Bengio & Haffner 1998, §II.B and Fig. 2).

C1: 6 maps 5x5 -> S2: 2x2 average -> C3: 16 maps 5x5 -> S4: 2x2 average -> C5: 120 maps 5x5
(1x1 on the 32x32 input) -> F6: 84 units -> output. Squashing function: the paper's scaled
tanh, f(a) = 1.7159 tanh(2a/3) (Appendix A).

Registered in its common modern form, whose count for 10 classes and one input channel is the
classic 61,706: C3 connected to all six S2 maps (the paper's Table I connects each C3 map to a
subset), parameter-free average pooling (the paper's S-layers scale and bias each map), and a
linear output layer in place of the Euclidean RBF units. NHWC input of any channel count; on
inputs larger than 32x32 C5 is larger than 1x1 and F6 reads it flattened.
"""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from ..layers import ClassifierHead, avg_pool, check_image_batch, conv2d, tap
from ..registry import register

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def scaled_tanh(x):
    """LeCun et al. 1998, Appendix A: A tanh(S a) with A = 1.7159, S = 2/3 (f(1) = 1)."""
    return 1.7159 * jnp.tanh(x * (2.0 / 3.0))


class LeNet5(nn.Module):
    """``num_classes=0`` returns F6's 84 features; ``features_only`` the C5 map."""

    num_classes: int = 10
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # no residual blocks to drop; accepted for a uniform surface
    dtype: Optional[jnp.dtype] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # fan-in scaling, as the paper's uniform +-2.4 / F_in init intends, suits the tanh
        conv = lambda ch, name: conv2d(
            ch,
            5,
            padding='valid',
            use_bias=True,
            name=name,
            kernel_init=nn.initializers.lecun_normal(),
            **kw,
        )
        check_image_batch(x, 32, type(self).__name__)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        # levels: C1 and C3 before their subsampling layers, then C5
        x = avg_pool(tap(scaled_tanh(conv(6, 'c1')(x)), 'c1'), 2, 2)
        x = avg_pool(tap(scaled_tanh(conv(16, 'c3')(x)), 'c3'), 2, 2)
        x = tap(scaled_tanh(conv(120, 'c5')(x)), 'c5')
        if features_only:
            return x
        x = scaled_tanh(nn.Dense(84, name='f6', **kw)(x.reshape(x.shape[0], -1)))
        return ClassifierHead(self.num_classes, self.drop_rate, name='head', **kw)(x, train)


register(
    'lenet5',
    LeNet5,
    family='lenet',
    input_size=(32, 32, 1),
    mean=MNIST_MEAN,
    std=MNIST_STD,
    num_classes=10,
    min_input=32,
    reference='LeCun et al. 1998, Gradient-Based Learning, Fig. 2 (modern form: full C3, '
    'plain average pooling, linear output; hand count)',
    reference_params=61_706,
)
