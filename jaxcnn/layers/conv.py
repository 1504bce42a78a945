"""What a convolution and a pooling compute, shared by every family: padding conventions, the
2-D convolution, pools. How a convolution runs on a backend (oneDNN, restated gradients, tap
sums) is not decided here but by the kernel policy of :mod:`jaxcnn.kernels`, which
:func:`conv2d` calls through.

Two padding conventions matter when weights come from elsewhere:
  * 'torch': symmetric padding of ``dilation * (k - 1) // 2`` on each side, as PyTorch's
    ``nn.Conv2d(padding=k // 2)`` does; with stride 2 on an even input this drops the last
    row/column rather than padding it.
  * 'same': TensorFlow's dynamic "SAME" padding (extra pad goes bottom/right), which the
    ``tf_`` ports in timm reproduce with ``Conv2dSame``.
"""

from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import kernels

# He et al. 2015 init with fan-out, as torchvision initialises ResNet convolutions.
he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def torch_padding(kernel_size, dilation=1):
    """Symmetric (lo, hi) padding per spatial dim that keeps size at stride 1 (odd kernels)."""
    ks, ds = _pair(kernel_size), _pair(dilation)
    return tuple((d * (k - 1) // 2, d * (k - 1) // 2) for k, d in zip(ks, ds))


def resolve_padding(padding, kernel_size, dilation=1):
    """Turn a padding spec ('torch', 'same', 'valid', int or explicit pairs) into nn.Conv's form."""
    if padding == 'torch':
        return torch_padding(kernel_size, dilation)
    if padding == 'same':
        return 'SAME'
    if padding == 'valid':
        return 'VALID'
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding, (tuple, list)):
        return tuple(_pair(p) for p in padding)
    raise ValueError(f"padding must be 'torch', 'same', 'valid', an int or pairs, got {padding!r}")


def conv2d(
    features: int,
    kernel_size: Union[int, Sequence[int]] = 3,
    stride=1,
    *,
    padding: Any = 'torch',
    groups: int = 1,
    dilation=1,
    use_bias: bool = False,
    dtype=None,
    param_dtype=jnp.float32,
    kernel_init=he_normal_fan_out,
    name: Optional[str] = None,
) -> nn.Conv:
    """A 2-D convolution (NHWC, HWIO kernel). ``groups == in_channels`` makes it depthwise."""
    return nn.Conv(
        features,
        _pair(kernel_size),
        strides=_pair(stride),
        padding=resolve_padding(padding, kernel_size, dilation),
        kernel_dilation=_pair(dilation),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        conv_general_dilated=kernels.conv_general_dilated,
        name=name,
    )


def depthwise_conv2d(channels: int, kernel_size=3, stride=1, **kwargs) -> nn.Conv:
    """Depthwise convolution: one filter per input channel."""
    return conv2d(channels, kernel_size, stride, groups=channels, **kwargs)


def max_pool(x, window=3, stride=2, padding='torch'):
    """Max pooling with the same padding conventions as :func:`conv2d`; PyTorch pads max-pool
    with -inf, which is what ``nn.max_pool`` does with explicit pads."""
    window, stride = _pair(window), _pair(stride)
    return nn.max_pool(x, window, stride, resolve_padding(padding, window))


def avg_pool(x, window=2, stride=2, padding='valid', count_include_pad=True):
    return nn.avg_pool(
        x,
        _pair(window),
        _pair(stride),
        resolve_padding(padding, window),
        count_include_pad=count_include_pad,
    )


def _adaptive_matrix(n_in: int, n_out: int) -> np.ndarray:
    # PyTorch's bins: output j averages input [floor(j n_in / n_out), ceil((j + 1) n_in / n_out))
    m = np.zeros((n_out, n_in), np.float32)
    for j in range(n_out):
        lo, hi = (j * n_in) // n_out, -(-((j + 1) * n_in) // n_out)
        m[j, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x, output_size):
    """``torch.nn.AdaptiveAvgPool2d`` on NHWC: any input size to ``output_size`` bins
    (a 1x1 map is replicated, as torchvision's AlexNet/VGG do at small inputs)."""
    oh, ow = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
    if x.shape[1:3] == (oh, ow):
        return x
    mh, mw = _adaptive_matrix(x.shape[1], oh), _adaptive_matrix(x.shape[2], ow)
    y = jnp.einsum(
        'ih,nhwc,jw->nijc', mh, x.astype(jnp.float32), mw, precision=jax.lax.Precision.HIGHEST
    )
    return y.astype(x.dtype)


def ceil_mode_padding(size: int, window: int, stride: int) -> Tuple[int, int]:
    """(0, extra) padding that makes an unpadded pool give PyTorch's ``ceil_mode=True`` size
    (Caffe's rounding, used by ZFNet and NiN)."""
    out = -(-(size - window) // stride) + 1
    if (out - 1) * stride >= size:  # PyTorch drops a last window that starts past the input
        out -= 1
    return 0, max((out - 1) * stride + window - size, 0)


def ceil_max_pool(x, window=3, stride=2):
    pads = tuple(ceil_mode_padding(s, window, stride) for s in x.shape[1:3])
    return max_pool(x, window, stride, padding=pads)  # pads with -inf: never selected


def global_avg_pool(x):
    """Mean over H and W, accumulated in float32 (or wider) for bf16 inputs."""
    return jnp.mean(x, axis=(1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32)).astype(x.dtype)


def channel_shuffle(x, groups: int):
    """ShuffleNet's channel shuffle: (g, c/g) -> (c/g, g) interleave of the channel axis."""
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """Round channels to a multiple of ``divisor`` without dropping more than 10 % (MobileNet rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def check_image_batch(x, min_size: int = 1, model: str = 'model'):
    """Fail with one readable line for inputs that are not an NHWC batch."""
    shape = getattr(x, 'shape', None)
    if shape is None or len(shape) != 4:
        raise ValueError(
            f'{model} expects an NHWC image batch (N, H, W, C), got shape {shape}; '
            'add a batch axis with x[None] or move channels last'
        )
    if shape[1] <= 4 < shape[3] == shape[2]:  # (N, C, H, W): a few channels, then a square
        raise ValueError(
            f'{model} expects channels-last images (N, H, W, C), got shape {shape}, '
            f'which looks channels-first (N, C, H, W); pass x.transpose(0, 2, 3, 1)'
        )
    if shape[1] < min_size or shape[2] < min_size:
        raise ValueError(
            f'{model} needs inputs of at least {min_size}x{min_size}, got '
            f'{shape[1]}x{shape[2]}; resize or pad the images'
        )
