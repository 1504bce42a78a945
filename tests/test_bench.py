"""The benchmark's figures follow their definitions (not timings: those live in BENCHMARKS.md)."""

import json
import types

import jax
import jax.numpy as jnp
import pytest

import jaxcnn
from jaxcnn import bench
from jaxcnn.summary import layer_costs
from helpers import jit_once, random_variables


def test_train_figures_are_consistent(tmp_path):
    r = bench.measure_train('lenet5', batch=4, size=32, num_classes=10, steps=2)
    assert r['images_per_sec'] == pytest.approx(4 / (r['ms_per_step'] / 1e3))
    assert r['achieved_flops'] == pytest.approx(r['flops_per_step'] / (r['ms_per_step'] / 1e3))
    # a training step costs at least forward (2 FLOPs per MAC) plus two backward products
    macs = sum(
        row.macs for row in layer_costs('lenet5', 32, channels=1) if row.kind in ('conv', 'fc')
    )
    assert r['flops_per_step'] >= 0.9 * 3 * 2 * macs * 4
    assert r['mfu'] is None  # no published peak for a CPU


def _step_loss_and_outputs(spec, batch, size, num_classes):
    """The bench's step's loss metric and, by hand, the model's training outputs on the very
    images the step sees (its uint8 data normalised), without dropout."""
    import numpy as np

    s = bench.Setup(spec, batch, size, num_classes=num_classes)
    _, metrics = jit_once(s.step)(*s.args)
    images, labels = (np.asarray(a) for a in s.arrays)
    x = (images / 255.0 - 0.5) / 0.25
    outputs, _ = jit_once(lambda v, x: s.model.apply(v, x, train=True, mutable=['batch_stats']))(
        s.variables, jnp.asarray(x, jnp.float32)
    )
    return float(metrics['loss']), outputs, labels


def _ce(logits, labels):
    import numpy as np

    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
    picked = np.take_along_axis(logp, np.asarray(labels)[..., None], -1)
    return -float(np.mean(picked))


def test_bench_times_the_trainers_own_step():
    s = bench.Setup('lenet5', 2, 32, num_classes=10)
    assert s.step.__qualname__ == 'make_train_step.<locals>.train_step'
    assert s.step.__module__ == 'jaxcnn.train'


def test_train_step_weighs_auxiliary_heads_as_the_trainer():
    """GoogLeNet trains with two auxiliary heads: the step's loss is CE(main) + 0.3 x the CE of
    each head (Szegedy et al. 2015), here computed by hand from the model's outputs, and the
    PyTorch side takes torchvision's tuple of outputs the same way."""
    loss, (logits, aux), labels = _step_loss_and_outputs(
        'googlenet:drop_rate=0.0:aux_drop_rate=0.0', 2, 64, 10
    )
    assert len(aux) == 2
    assert loss == pytest.approx(
        _ce(logits, labels) + 0.3 * (_ce(aux[0], labels) + _ce(aux[1], labels)), rel=1e-5
    )
    torch_r = next(bench.torch_rounds('googlenet', 2, 64, 'train', num_classes=10, steps=1))
    assert torch_r['model'] == 'torch:tv:googlenet' and torch_r['images_per_sec'] > 0


def test_train_step_of_a_dense_prediction_model_averages_over_pixels():
    """U-Net predicts every pixel: the step's loss is the mean per-pixel cross-entropy, each
    pixel labelled with its image's class."""
    import numpy as np

    loss, logits, labels = _step_loss_and_outputs('unet_small', 2, 16, 2)
    assert logits.shape == (2, 16, 16, 2)
    pixel_labels = np.broadcast_to(labels[:, None, None], logits.shape[:-1])
    assert loss == pytest.approx(_ce(logits, pixel_labels), rel=1e-5)


def test_infer_and_compile_and_latency():
    r = bench.measure_infer('lenet5', batch=2, size=32, num_classes=10, steps=2)
    assert r['kind'] == 'infer' and r['images_per_sec'] > 0
    c = bench.measure_compile('lenet5', batch=2, size=32, num_classes=10)
    assert c['compile_s'] > 0
    lat = bench.measure_latency('lenet5', sizes=(1, 2), size=32, steps=1)
    assert sorted(lat) == [1, 2] and all(v > 0 for v in lat.values())


def test_mfu_uses_the_devices_peak():
    h100 = types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3')
    assert bench.peak_flops(h100, jnp.bfloat16) == 989e12
    assert bench.peak_flops(types.SimpleNamespace(device_kind='cpu'), jnp.float32) is None


def test_cli_writes_a_record_with_the_torch_ratio(tmp_path, capsys):
    out = tmp_path / 'r.json'
    assert (
        bench.main(
            [
                'train',
                '--model',
                'resnet18',
                '--batch',
                '2',
                '--size',
                '32',
                '--steps',
                '1',
                '--vs',
                'timm',
                '--out',
                str(out),
            ]
        )
        == 0
    )
    record = json.load(open(out))
    jax_r, torch_r = record['results']
    assert torch_r['model'] == 'torch:tv:resnet18'
    assert torch_r['ratio_jaxcnn_over_torch'] == pytest.approx(
        jax_r['images_per_sec'] / torch_r['images_per_sec']
    )
    assert {'jax', 'flax', 'device', 'command'} <= set(record)
    assert 'jaxcnn / timm' in capsys.readouterr().out


def test_rounds_compare_the_best_of_alternating_measurements(tmp_path):
    out = tmp_path / 'r.json'
    assert (
        bench.main(
            [
                'infer',
                '--model',
                'resnet18',
                '--batch',
                '2',
                '--size',
                '32',
                '--steps',
                '1',
                '--vs',
                'timm',
                '--rounds',
                '2',
                '--out',
                str(out),
            ]
        )
        == 0
    )
    jax_r, torch_r = json.load(open(out))['results']
    for r in (jax_r, torch_r):
        assert len(r['ms_per_step_rounds']) == 2
        assert r['ms_per_step'] == min(r['ms_per_step_rounds'])
    assert torch_r['ratio_jaxcnn_over_torch'] == pytest.approx(
        min(torch_r['ms_per_step_rounds']) / min(jax_r['ms_per_step_rounds'])
    )


def test_kernel_forms_benchmark_compiles_each_variant_as_named():
    """benchmarks/kernel_forms.py: the CPU policy's step calls oneDNN, the step without it and
    the plain policy's do not, and the plain policy's XLA options are XLA's own route."""
    from benchmarks import kernel_forms

    labels = {}
    for label, policy, extra in kernel_forms.variants(('onednn',)):
        step, _, options = kernel_forms.compile_step('resnet20', 2, 16, policy, extra)
        labels[label] = (step is not None and 'JaxcnnConvForward' in step.as_text(), options)
    assert labels['cpu policy'][0] and not labels['without onednn'][0]
    assert not labels['plain, XLA defaults'][0] and labels['plain, XLA defaults'][1] == {}
    assert labels['plain, xla_cpu_use_onednn'][1] == {'xla_cpu_use_onednn': True}
    # XLA's own routes in place of the handlers: its oneDNN rewrite, its defaults (YNNPACK)
    rewrite, defaults = (
        labels['without onednn, xla_cpu_use_onednn'],
        labels['without onednn, XLA defaults'],
    )
    assert not rewrite[0] and rewrite[1]['xla_cpu_use_onednn'] is True
    assert not defaults[0] and defaults[1] == {}


def test_an_input_too_small_for_the_pytorch_twin_is_one_clear_error():
    # torchvision's Inception-v3 auxiliary head needs more than 75 px; jaxcnn's model runs there
    with pytest.raises(
        ValueError, match='PyTorch twin tv:inception_v3 cannot run a train step at 75x75'
    ):
        next(bench.torch_rounds('inception_v3', 2, 75, 'train', num_classes=10, steps=1))


def test_unknown_model_is_one_clear_error():
    with pytest.raises(ValueError, match='unknown model'):
        bench.main(['infer', '--model', 'resnet_18'])


@pytest.mark.parametrize(
    'argv, message',
    [
        (
            ['train', '--model', 'resnet18', '--steps', '0'],
            'argument --steps: must be at least 1, got 0',
        ),
        (
            ['infer', '--model', 'resnet18', '--batch', '-2'],
            'argument --batch: must be at least 1, got -2',
        ),
        (
            ['memory', '--models', 'resnet18', '--size', 'big'],
            "argument --size: expected an integer, got 'big'",
        ),
        (
            ['latency', '--models', 'resnet18', '--batch-sizes', '1,0'],
            'argument --batch-sizes: must be at least 1, got 0',
        ),
    ],
)
def test_a_count_below_one_is_one_clear_error(argv, message, capsys):
    # before any model is built: argparse's usage line, then one line naming the option
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_model_spec_sets_model_arguments():
    _, model = bench.build('revnet38:plain:scan_unroll=4:remat=True', 10, jnp.float32)
    assert model.reversible is False and model.scan_unroll == 4 and model.remat is True
    with pytest.raises(ValueError, match='neither'):
        bench.build('revnet38:fast', 10, jnp.float32)


def test_model_specs_keep_commas_inside_brackets():
    specs = bench.split_specs('revnet164:layers=(2,2,2),revnet164,resnet32:plain')
    assert specs == ['revnet164:layers=(2,2,2)', 'revnet164', 'resnet32:plain']
    _, model = bench.build(specs[0], 10, jnp.float32)
    assert model.layers == (2, 2, 2) and model.bottleneck


def test_allocator_peak_is_read_where_the_backend_keeps_statistics():
    class Gpu:
        def memory_stats(self):
            return {'bytes_in_use': 10, 'peak_bytes_in_use': 3 * 2**20}

    class Cpu:
        def memory_stats(self):
            return None

    assert bench.allocator_peak_bytes(Gpu()) == 3 * 2**20
    assert bench.allocator_peak_bytes(Cpu()) is None
    # on this CPU the record carries XLA's analysis only, no allocator figure
    r = bench.measure_memory('resnet20', 2, 16)
    assert 'allocator_peak_bytes' not in r and r['peak_bytes'] > 0


def test_step_profile_sums_each_operation_kind_per_step(tmp_path):
    import gzip
    from benchmarks.cpu_step_profile import op_times

    events = [
        {'ph': 'X', 'name': 'transpose_copy_fusion.29', 'dur': 4000},
        {'ph': 'X', 'name': 'transpose_copy_fusion', 'dur': 2000},
        {'ph': 'X', 'name': 'ynn_fusion.3', 'dur': 1000},
        {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 9000},  # the executor, not an op
        {'ph': 'X', 'name': '$api.py:2479 block_until_ready', 'dur': 9000},
        {'ph': 'X', 'name': 'end: ynn_fusion', 'dur': 5},
        {'ph': 'i', 'name': 'ynn_fusion.4', 'dur': 7000},  # not a duration event
    ]
    trace = tmp_path / 'trace.json.gz'
    with gzip.open(trace, 'wt') as f:
        json.dump({'traceEvents': events}, f)
    times = op_times(str(trace), steps=2)  # microseconds in, ms per step out
    assert dict(times) == {'transpose_copy_fusion': 3.0, 'ynn_fusion': 0.5}


def test_conv_kernels_experiment_reads_every_convolution_of_the_model():
    """ResNet-18 (He et al. 2016, Table 1) has 20 convolutions: the 7x7 stem, two 3x3 per basic
    block (8 blocks) and three 1x1 projection shortcuts; only the stem reads the images."""
    from benchmarks.conv_kernels_cpu import model_convolutions

    model = jaxcnn.create_model('resnet18', num_classes=10)
    x = jnp.zeros((2, 128, 128, 3))  # last stage 4x4: no map smaller than its kernel
    variables = random_variables(model, x.shape)
    convs = model_convolutions(model, variables, x)
    kernels = sorted(tuple(rhs[:2]) for _, _, rhs, _ in convs)
    assert len(convs) == 20
    assert kernels.count((3, 3)) == 16 and kernels.count((1, 1)) == 3 and kernels.count((7, 7)) == 1
    assert [rhs[:2] for _, _, rhs, reads in convs if reads] == [(7, 7)]


def test_flops_are_counted_on_the_host_program():
    """A valid 3x3 convolution costs 2 FLOPs per multiply-add: N*Ho*Wo*Cout*Cin*9 of them."""
    x = jnp.zeros((2, 10, 12, 5), jnp.bfloat16)
    w = jnp.zeros((3, 3, 5, 7), jnp.bfloat16)
    conv = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    assert bench.count_flops(conv, (x, w)) == 2 * (2 * 8 * 10 * 7 * 5 * 9)


def test_parallel_builds_together_and_times_one_at_a_time(tmp_path):
    """--parallel: every model compiled before any is timed, and no two timed at once; each
    spawned process compiles with the --xla-options given (XLA's defaults here, where the
    policy's own choice for a ResNet would be XLA's dense convolutions)."""
    from jaxcnn import kernels

    assert kernels.cpu.accepted(tuple(kernels.cpu.DENSE_OPTIONS.items()))  # the two differ
    out = tmp_path / 'p.json'
    assert (
        bench.main(
            [
                'train',
                '--model',
                'resnet18,resnet34',
                '--batch',
                '2',
                '--size',
                '32',
                '--steps',
                '1',
                '--vs',
                'timm',
                '--rounds',
                '2',
                '--parallel',
                '--xla-options',
                'defaults',
                '--out',
                str(out),
            ]
        )
        == 0
    )
    results = json.load(open(out))['results']
    assert [r['model'] for r in results] == [
        'resnet18',
        'torch:tv:resnet18',
        'resnet34',
        'torch:tv:resnet34',
    ]
    ours = [r for r in results if not r['model'].startswith('torch:')]
    assert [r['xla_options'] for r in ours] == [{}, {}]
    windows = sorted(r['timed_unix'] for r in ours)
    assert max(r['ready_unix'] for r in ours) <= windows[0][0]
    assert windows[0][1] <= windows[1][0]
    for jax_r, torch_r in zip(results[::2], results[1::2]):
        assert len(jax_r['ms_per_step_rounds']) == 2
        assert torch_r['ratio_jaxcnn_over_torch'] == pytest.approx(
            jax_r['images_per_sec'] / torch_r['images_per_sec']
        )


def test_parallel_reports_a_failed_model_and_times_the_others(tmp_path, capsys):
    out = tmp_path / 'p.json'
    # resnet20 (CIFAR) has no PyTorch twin: its process fails, resnet18's goes on
    assert (
        bench.main(
            [
                'train',
                '--model',
                'resnet18,resnet20',
                '--batch',
                '2',
                '--size',
                '32',
                '--steps',
                '1',
                '--vs',
                'timm',
                '--parallel',
                '--out',
                str(out),
            ]
        )
        == 1
    )
    assert [r['model'] for r in json.load(open(out))['results']] == [
        'resnet18',
        'torch:tv:resnet18',
    ]
    assert 'resnet20: failed: ValueError: resnet20 has no PyTorch twin' in capsys.readouterr().err


def test_flops_count_every_run_of_a_scanned_block():
    """XLA's cost analysis counts a loop body once: ResNet-34 with its repeated blocks scanned
    must still cost what the unrolled network costs."""
    counts = {}
    for spec in ('resnet34', 'resnet34:scan_blocks=True'):
        s = bench.Setup(spec, 2, 32, num_classes=10)
        counts[spec] = bench.count_flops(s.step, s.args)
    assert counts['resnet34:scan_blocks=True'] == pytest.approx(counts['resnet34'], rel=1e-3)


def test_flops_command_matches_the_train_record(tmp_path):
    out = tmp_path / 'f.json'
    assert (
        bench.main(
            [
                'flops',
                '--model',
                'lenet5',
                '--batch',
                '4',
                '--size',
                '32',
                '--num-classes',
                '10',
                '--out',
                str(out),
            ]
        )
        == 0
    )
    (r,) = json.load(open(out))['results']
    train = bench.measure_train('lenet5', batch=4, size=32, num_classes=10, steps=1)
    assert r['flops_per_step'] == train['flops_per_step'] == 4 * r['flops_per_image']


def test_every_record_the_documents_cite_is_committed():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    results = root / 'benchmarks' / 'results'
    text = (root / 'README.md').read_text() + (root / 'BENCHMARKS.md').read_text()
    cited = set(re.findall(r'benchmarks/results/([\w.\-/]+\.(?:json|csv|log|png))', text))
    cited.discard('cpu_xla_options_O.json')  # a template: O in defaults, dense, trainer
    cited |= set(re.findall(r'\b(cpu_xla_options_\w+\.json)', text)) - {'cpu_xla_options_O.json'}
    cited |= set(re.findall(r'\b([\w\-]+_h100[\w\-]*\.(?:json|csv|log|png))', text))
    assert cited and not [c for c in sorted(cited) if not (results / c).exists()]
