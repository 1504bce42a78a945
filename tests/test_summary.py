"""The per-layer cost table: AlexNet's totals against a hand count, receptive fields against
the stacking formula, parameters against the model, MACs against XLA's cost analysis."""

import pytest

import jaxcnn
from jaxcnn.summary import format_table, layer_costs, main, xla_flops
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
