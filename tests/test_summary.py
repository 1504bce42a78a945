"""The per-layer cost table: AlexNet's totals against a hand count, receptive fields against
the stacking formula, parameters against the model, MACs against XLA's cost analysis. The
feature-level table (``--features``): receptive fields against the published figures and hand
derivations, its shapes against ``feature_info``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxcnn
from jaxcnn.config import run_cli
from jaxcnn.layers import conv2d, max_pool, tap
from jaxcnn.layers.features import FeaturePyramid
from jaxcnn.layers.reversible import depth_to_space, space_to_depth
from jaxcnn.models.resnet import ResidualBlock
from jaxcnn.summary import feature_levels, format_table, layer_costs, main, xla_flops
from helpers import abstract_variables


def out_size(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def test_alexnet_table_equals_hand_count():
    """torchvision AlexNet at 224: conv rows (C_out, K, S, P), 3x3/2 max-pools after 1, 2, 5."""
    convs = [(64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)]
    pool_after = {0, 1, 4}
    n, c_in, macs, params, memory_kb = 224, 3, 0, 0, 0.0
    for i, (c, k, s, p) in enumerate(convs):
        n = out_size(n, k, s, p)
        macs += n * n * c * c_in * k * k
        params += c_in * k * k * c + c
        memory_kb += n * n * c * 4 / 1024
        c_in = c
        if i in pool_after:
            n = out_size(n, 3, 2, 0)
            macs += n * n * c * 9
            memory_kb += n * n * c * 4 / 1024
    for f_in, f_out in [(256 * 6 * 6, 4096), (4096, 4096), (4096, 1000)]:
        macs += f_in * f_out
        params += f_in * f_out + f_out
        memory_kb += f_out * 4 / 1024
    rows = layer_costs('alexnet', 224)
    assert [r.kind for r in rows] == [
        'conv',
        'maxpool',
        'conv',
        'maxpool',
        'conv',
        'conv',
        'conv',
        'maxpool',
        'fc',
        'fc',
        'fc',
    ]
    assert rows[0].output_chw == (64, 55, 55) and rows[-1].output_chw == (1000,)
    assert sum(r.macs for r in rows) == macs
    assert sum(r.params for r in rows) == params == 61_100_840
    assert sum(r.memory_kb for r in rows) == pytest.approx(memory_kb)
    # the lecture's conv1 row: 64x55x55 output, 756.25 KB, 23,296 parameters
    assert (rows[0].memory_kb, rows[0].params) == (64 * 55 * 55 * 4 / 1024, 23_296)


def test_receptive_field_follows_stacking_formula():
    # VGG-16: L stacked 3x3 stride-1 convs see 1 + 2L pixels; a 2x2/2 pool doubles the jump
    rows = layer_costs('vgg16', 32)
    rf = [r.receptive_field for r in rows if r.kind in ('conv', 'maxpool')]
    assert rf[:3] == [3, 5, 6]  # conv1_1, conv1_2, pool1
    assert rf[3:5] == [6 + 2 * 2, 6 + 4 * 2]  # conv2_1, conv2_2 at jump 2


def test_rows_plus_other_parameters_equal_the_model():
    rows = layer_costs('resnet18', 64)
    layer_params = sum(r.params for r in rows)
    total = jaxcnn.count_params(
        abstract_variables(jaxcnn.create_model('resnet18'), (1, 64, 64, 3))['params']
    )
    bn = total - layer_params  # everything else is BatchNorm scale and bias
    assert bn > 0 and bn % 2 == 0
    table = format_table(rows, total)
    assert f'{total:,}' in table and 'model total' in table


def test_scanned_blocks_count_once_each():
    # a scanned CIFAR ResNet has the same rows and MACs as the unrolled one
    plain = layer_costs(jaxcnn.create_model('resnet56', scan_blocks=False), 32)
    scanned = layer_costs(jaxcnn.create_model('resnet56', scan_blocks=True), 32)
    assert len(plain) == len(scanned)
    assert sum(r.macs for r in plain) == sum(r.macs for r in scanned)
    assert sum(r.params for r in plain) == sum(r.params for r in scanned)


def test_macs_agree_with_xla_where_definitions_coincide():
    """LeNet-5 has no padding: XLA's FLOPs are 2 x the table's MACs plus element-wise work
    (tanh, bias adds) of a few percent."""
    rows = layer_costs('lenet5', 32, channels=1)
    macs = sum(r.macs for r in rows)
    flops = xla_flops('lenet5', 32, channels=1)
    assert 2 * macs <= flops <= 1.1 * 2 * macs


def test_cli_prints_the_table(capsys):
    assert main(['lenet5']) == 0
    out = capsys.readouterr().out
    assert 'c1' in out and '61,706' in out and 'MACs' in out


def test_cli_rejects_a_too_small_input():
    with pytest.raises(ValueError, match='at least'):
        main(['alexnet', '--input', '32'])


def test_cli_rejects_zero_channels(capsys):
    with pytest.raises(SystemExit):
        main(['alexnet', '--channels', '0'])
    assert (
        capsys.readouterr().err.strip().endswith('argument --channels: must be at least 1, got 0')
    )


def _one_twin_per_family():
    picked = {}
    for name in jaxcnn.list_models():
        info = jaxcnn.model_info(name)
        if info.torch_name:
            picked.setdefault(info.family, name)
    # variants whose layers the first of their family lacks: grouped and SE bottlenecks,
    # hard-swish and SE in MobileNetV3, CondConv's expert mixing, NFNet's weight-standardised
    # convolutions, Inception's asymmetric kernels
    extra = [
        'resnext50_32x4d',
        'seresnet50',
        'mobilenetv3_large_100',
        'efficientnet_cc_b0_4e',
        'nfnet_f0',
        'inception_v3',
    ]
    return sorted(set(picked.values()) | set(extra))


@pytest.mark.parametrize('name', _one_twin_per_family())
def test_macs_equal_pytorch_flop_counter(name):
    """The table's multiply-adds of every convolution, fully connected layer and other product
    equal PyTorch's FlopCounterMode count (2 per multiply-add) of the timm/torchvision twin,
    run on the meta device at the model's input size."""
    import timm
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    info = jaxcnn.model_info(name)
    lib, twin = info.torch_name.split(':')
    h, w, c = info.input_size
    with torch.device('meta'):
        net = (
            getattr(torchvision.models, twin)(weights=None)
            if lib == 'tv'
            else timm.create_model(twin, pretrained=False)
        ).eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, c, h, w))
    rows = layer_costs(name, h, c)
    macs = sum(r.macs for r in rows if r.kind in ('conv', 'fc', 'product'))
    assert 2 * macs == counter.get_total_flops(), counter.get_flop_counts()['Global']


# ---------------------------------------------------------------------------------------------
# Feature levels (`--features`): receptive field r and jump j of each pyramid level.
#
# Published figures: Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural
# Networks", Distill 2019 (doi:10.23915/distill.00021), computed with their library
# google-research/receptive_field on the TF-Slim models; its README and
# receptive_field/RECEPTIVE_FIELD_TABLE.md list (end-point: RF, effective stride):
#   alexnet_v2    conv1 11/4, conv2 51/8, conv5 163/16, pool5 195/32
#   vgg_16        conv1_1 3/1, conv2_1 10/2, conv3_2 32/4, conv4_2 76/8, conv5_2 164/16,
#                 pool5 212/32
#   mobilenet_v1  Conv2d_1_pointwise 7/2, Conv2d_3_pointwise 19/4, Conv2d_5_pointwise 43/8,
#                 Conv2d_11_pointwise 219/16, Conv2d_13_pointwise 315/32
#   inception_v3  Conv2d_2b_3x3 11/2, Conv2d_4a_3x3 23/4, Mixed_5d 127/8, Mixed_6e 927/16,
#                 Mixed_7c 1311/32 (concatenated branches, 1x7/7x1 factorised kernels)
#   resnet_v1_50  block1 35/8, block2 99/16, block3 291/32, block4 483/32
# Kernel sizes and strides, all that r and j depend on, are torchvision's for AlexNet and VGG and
# MobileNet v1's (a 3x3/2 stem, 13 depthwise-separable blocks) for mobilenetv1, Inception v3's
# (Szegedy et al. 2016, the paper both implementations follow) for inception_v3.

PUBLISHED = {
    # torchvision AlexNet's ReLU after conv1, conv2, conv5, then pool5
    'alexnet': {
        'features.1': (11, 4),
        'features.4': (51, 8),
        'features.11': (163, 16),
        'features.12': (195, 32),
    },
    # the last conv of each VGG-16 block is one 3x3 after a published conv (r + 2 j), then pool5
    'vgg16': {
        'features.3': (3 + 2 * 1, 1),  # conv1_2 after conv1_1
        'features.8': (10 + 2 * 2, 2),  # conv2_2 after conv2_1
        'features.15': (32 + 2 * 4, 4),  # conv3_3 after conv3_2
        'features.22': (76 + 2 * 8, 8),  # conv4_3 after conv4_2
        'features.29': (164 + 2 * 16, 16),  # conv5_3 after conv5_2
        'features.30': (212, 32),  # pool5, as published
    },
    # the stage outputs: pointwise convs 1, 3, 5, 11 and 13
    'mobilenetv1_025': {
        'blocks.0': (7, 2),
        'blocks.1': (19, 4),
        'blocks.2': (43, 8),
        'blocks.3': (219, 16),
        'blocks.4': (315, 32),
    },
    # timm's level names are Slim's end-points
    'inception_v3': {
        'Conv2d_2b_3x3': (11, 2),
        'Conv2d_4a_3x3': (23, 4),
        'Mixed_5d': (127, 8),
        'Mixed_6e': (927, 16),
        'Mixed_7c': (1311, 32),
    },
}
INPUT = {'vgg16': 32, 'inception_v3': 75}  # small inputs: fields do not depend on the size


def _fields(rows):
    return {r.module: (r.receptive_field, r.jump) for r in rows}


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_feature_levels_match_published_receptive_fields(name):
    fields = _fields(feature_levels(name, INPUT.get(name, 64)))
    assert {m: fields.get(m) for m in PUBLISHED[name]} == PUBLISHED[name]


class _SlimResNetV1(nn.Module):
    """TF-Slim's resnet_v1_50 layout (tensorflow/models research/slim/nets/resnet_v1.py): the
    7x7/2 conv and 3x3/2 max-pool root, then blocks of 3, 4, 6, 3 bottleneck units whose stride
    (on the 3x3 conv, as here) sits on the *last* unit of blocks 1-3; block4 keeps stride 1.
    Tiny widths: receptive fields do not depend on them."""

    @nn.compact
    def __call__(self, x, train=False, features_only=False):
        x = max_pool(conv2d(4, 7, 2, name='conv1')(x), 3, 2)
        for s, units in enumerate((3, 4, 6, 3)):
            for u in range(units):
                stride = 2 if u == units - 1 and s < 3 else 1
                x = ResidualBlock('bottleneck', 2, stride, name=f'block{s + 1}_{u}')(x, train)
            tap(x, f'block{s + 1}')
        return x


def test_resnet_v1_layout_gives_published_resnet50_fields():
    rows = feature_levels(FeaturePyramid(_SlimResNetV1()), 64)
    assert _fields(rows) == {
        'block1': (35, 8),
        'block2': (99, 16),
        'block3': (291, 32),
        'block4': (483, 32),
    }


def test_resnet50_levels_by_hand_and_against_the_published_layout():
    """jaxcnn's resnet50 is torchvision's and timm's (v1.5): the stride sits on the 3x3 conv of
    the *first* block of layers 2-4, so its last level sees 427 px, not the published 483 of
    resnet_v1_50 (stride on the last unit of blocks 1-3, test above). By hand, r += (k - 1) j:
      act1   conv 7x7/2                                   r = 7,               j = 2
      layer1 max-pool 3x3/2: 7 + 2*2 = 11, j = 4; 3 blocks' 3x3: 11 + 3*2*4   r = 35,  j = 4
      layer2 3x3/2 at j=4: 35 + 8 = 43, j = 8; 3 more blocks: 43 + 3*2*8      r = 91,  j = 8
      layer3 3x3/2 at j=8: 91 + 16 = 107, j = 16; 5 more: 107 + 5*2*16       r = 267, j = 16
      layer4 3x3/2 at j=16: 267 + 32 = 299, j = 32; 2 more: 299 + 2*2*32     r = 427, j = 32
    Per jump, the 3x3 convs are j=4: 4, j=8: 4, j=16: 6, j=32: 2 here and 3, 4, 6, 3 in the
    published layout: one 3x3 moves from j=32 to j=4, so 483 - 427 = 2*32 - 2*4 = 56."""
    rows = feature_levels('resnet50', 64)
    assert [(r.receptive_field, r.jump) for r in rows] == [
        (7, 2),
        (35, 4),
        (91, 8),
        (267, 16),
        (427, 32),
    ]
    assert rows[-1].receptive_field == 483 - 56


def test_resnet18_levels_by_hand():
    """r += (k - 1) j, j *= stride along the deepest path (the residual branch):
      act1   conv 7x7/2                                          r = 7,   j = 2
      layer1 max-pool 3x3/2: 7 + 2*2 = 11, j = 4;
             2 basic blocks of two 3x3: 11 + 4 * (2*4) = 43      r = 43,  j = 4
      layer2 3x3/2 at j=4: 43 + 8 = 51, j = 8; 3 more 3x3: +3*16  r = 99,  j = 8
      layer3 3x3/2 at j=8: 99 + 16 = 115, j = 16; 3 more: +3*32   r = 211, j = 16
      layer4 3x3/2 at j=16: 211 + 32 = 243, j = 32; 3 more: +3*64 r = 435, j = 32
    The 1x1/2 projection shortcuts (r unchanged) lose to the residual branch at each sum."""
    rows = feature_levels('resnet18', 64)
    assert [r.module for r in rows] == ['act1', 'layer1', 'layer2', 'layer3', 'layer4']
    assert [(r.receptive_field, r.jump) for r in rows] == [
        (7, 2),
        (43, 4),
        (99, 8),
        (211, 16),
        (435, 32),
    ]
    assert not any(r.global_context for r in rows)


def test_convnext_levels_by_hand():
    """ConvNeXt-T: a 4x4/4 patchify stem (r = 4, j = 4), each block one 7x7 depthwise conv
    (r += 6 j), 2x2/2 downsampling between stages (r += j, j *= 2); depths 3, 3, 9, 3:
      stages.0  4 + 3*6*4 = 76                      j = 4
      stages.1  76 + 4 = 80, + 3*6*8 = 224          j = 8
      stages.2  224 + 8 = 232, + 9*6*16 = 1096      j = 16
      stages.3  1096 + 16 = 1112, + 3*6*32 = 1688   j = 32"""
    rows = feature_levels('convnext_tiny', 64)
    assert [(r.receptive_field, r.jump) for r in rows] == [
        (76, 4),
        (224, 8),
        (1096, 16),
        (1688, 32),
    ]


def test_scanned_and_rematerialised_stages_count_every_block():
    """CIFAR ResNet-20 (3x3 stem, 3 basic blocks per stage, stride on the first block's first
    3x3): stem r = 3; layer1 3 + 3*2*2 = 15; layer2 15 + 2 = 17 (j = 2), + 5*2*2 = 37;
    layer3 37 + 4 = 41 (j = 4), + 5*2*4 = 81. Blocks 2-3 of each stage run as one scan body
    applied twice, each under remat."""
    expected = [(3, 1), (15, 1), (37, 2), (81, 4)]
    for kw in ({}, {'scan_blocks': True, 'remat': True}):
        pyramid = jaxcnn.create_model('resnet20', features_only=True, **kw)
        rows = feature_levels(pyramid, 32)
        assert [(r.receptive_field, r.jump) for r in rows] == expected, kw


class _Branches(nn.Module):
    """Two summed branches, a concatenation, a squeeze-and-excitation gate, a strided slice,
    i-RevNet's invertible down- and upsampling."""

    @nn.compact
    def __call__(self, x, train=False, features_only=False):
        a = nn.Conv(4, (3, 3), padding='SAME')(x)  # r = 3
        b = nn.Conv(4, (5, 5), kernel_dilation=2, padding='SAME')(x)  # (5 - 1) * 2 + 1 = 9
        x = tap(a + b, 'sum')  # the wider branch: 9, j = 1
        c = nn.Conv(4, (3, 3), strides=2, padding='SAME')(x)  # 9 + 2 = 11, j = 2
        p = nn.avg_pool(a, (3, 3), (2, 2), padding='SAME')  # 3 + 2 = 5, j = 2
        x = tap(jnp.concatenate([p, c], -1), 'concat')  # 11, j = 2
        x = tap(x * jax.nn.sigmoid(x.mean((1, 2), keepdims=True)), 'gated')  # + global
        tap(x[:, ::2, ::2], 'subsampled')  # 11, j = 4
        s = tap(space_to_depth(a, 2), 'space_to_depth')  # a 2x2/2 window: 3 + 1 = 4, j = 2
        tap(depth_to_space(s, 2), 'depth_to_space')  # each unit one of s's: 4, j = 1
        return x


def test_branches_take_the_wider_field_and_global_pooling_is_marked():
    rows = feature_levels(FeaturePyramid(_Branches()), 16)
    assert [(r.module, r.receptive_field, r.jump, r.global_context) for r in rows] == [
        ('sum', 9, 1, False),
        ('concat', 11, 2, False),
        ('gated', 11, 2, True),
        ('subsampled', 11, 4, True),
        ('space_to_depth', 4, 2, False),
        ('depth_to_space', 4, 1, False),
    ]


def test_cli_prints_one_row_per_feature_level(capsys):
    assert main(['resnet18', '--features', '--input', '64']) == 0
    lines = capsys.readouterr().out.splitlines()
    info = jaxcnn.feature_info('resnet18', input_size=(64, 64, 3))
    assert lines[0].startswith('resnet18 feature levels at 3x64x64')
    assert lines[1].split() == ['level', 'module', 'output', 'C/H/W', 'reduction', 'RF', 'jump']
    assert set(lines[2]) == {'-'}
    rows = [line.split() for line in lines[3:]]
    assert len(rows) == len(info)
    for row, level in zip(rows, info):
        side = 64 // level['reduction']  # resnet18 halves 64 px exactly
        assert row[:4] == [
            str(level['index']),
            level['module'],
            f'{level["num_chs"]}x{side}x{side}',
            str(level['reduction']),
        ]
    assert [row[4:] for row in rows] == [
        ['7', '2'],
        ['43', '4'],
        ['99', '8'],
        ['211', '16'],
        ['435', '32'],
    ]


def test_cli_features_rejects_bad_input_in_one_line(capsys):
    cases = [
        (['nosuch_model', '--features'], "unknown model 'nosuch_model'"),
        (['resnet18', '--features', '--xla'], 'does not combine with --features'),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: main(argv))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith('error: ') and '\n' not in err and message in err
