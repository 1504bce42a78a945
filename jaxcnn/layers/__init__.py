"""Building blocks shared by more than one family."""

from .activations import ACTIVATIONS, PReLU, get_act, hard_sigmoid, hard_swish, maxout, relu6, selu
from .classifier import ClassifierHead
from .conv import (
    adaptive_avg_pool,
    avg_pool,
    ceil_max_pool,
    ceil_mode_padding,
    check_image_batch,
    channel_shuffle,
    conv2d,
    depthwise_conv2d,
    global_avg_pool,
    he_normal_fan_out,
    make_divisible,
    max_pool,
    resolve_padding,
    torch_padding,
)
from .drop import DropBlock, DropPath, drop_path_rates
from .features import tap
from .norm import LocalResponseNorm, Norm, batch_norm
from .se import SqueezeExcite
