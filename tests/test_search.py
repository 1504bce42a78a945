"""FBNet's architecture search (jaxcnn/search.py): the supernet's mixing, the cost table and
loss, the export to a stage table and a registered model, and a tiny search end to end."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcnn
from jaxcnn import config as config_lib
from jaxcnn import registry
from jaxcnn import search
from jaxcnn.layers import make_divisible
from jaxcnn.layers.mbconv import MBConv
from jaxcnn.models.efficientnet import MBConvNet, Row
from jaxcnn.models.fbnet_searched import architecture_json, stages_from_json
from jaxcnn.models.mnasnet import FBNET_C
from helpers import jit_once

FMNIST = os.environ.get('JAXCNN_FMNIST_DIR', '/usr/share/datasets/fashion-mnist')
jax.config.update(
    'jax_compilation_cache_dir', os.path.join(tempfile.gettempdir(), 'jaxcnn_test_xla_cache')
)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

CANDS = search.DEFAULT_CANDIDATES
SMALL_MACRO = (
    search.MacroStage(16, 1, 1),
    search.MacroStage(24, 2, 2),
    search.MacroStage(32, 1, 2),
)

# FBNet-C's block per searchable layer of Table 1 (the fbnetc_100 table, 21 blocks), with the
# one skip of its 24-channel stage last: an identity layer's position does not change the net.
FBNET_C_CHOICES = (
    ['k3_e1']
    + ['k3_e6', 'k3_e1', 'k3_e1', 'skip']
    + ['k5_e6', 'k5_e3', 'k5_e6', 'k3_e6']
    + ['k5_e6', 'k5_e3', 'k5_e6', 'k5_e6']
    + ['k5_e6', 'k5_e6', 'k5_e6', 'k5_e3']
    + ['k5_e6'] * 4
    + ['k3_e6']
)


def _random(rng, shape):
    return jnp.asarray(rng.randn(*shape), jnp.float32)


def test_mixed_layer_with_one_hot_weights_is_that_candidate_alone():
    x = _random(np.random.RandomState(0), (2, 8, 8, 16))
    layer = search.MixedLayer(CANDS, out_ch=16, stride=1)
    variables = layer.init(jax.random.key(0), x, jnp.full((len(CANDS),), 1 / len(CANDS)))
    for k, name in enumerate(CANDS):
        mixed = layer.apply(variables, x, jax.nn.one_hot(k, len(CANDS)))
        cand = search.CANDIDATES[name]
        if cand.is_skip:
            alone = x
        else:
            block = MBConv('ir', 16, cand.kernel, 1, cand.exp)
            alone = block.apply(
                {
                    'params': variables['params'][name],
                    'batch_stats': variables['batch_stats'][name],
                },
                x,
            )
        np.testing.assert_allclose(mixed, alone, atol=1e-5, err_msg=name)


def test_gumbel_softmax_is_a_distribution_and_one_hot_as_tau_goes_to_zero():
    specs = search.layer_specs(SMALL_MACRO, 16, 32)
    mask = search.candidate_mask(specs, CANDS)
    theta = _random(np.random.RandomState(1), mask.shape)
    rng = jax.random.key(3)
    w = np.asarray(search.mixing_weights(theta, mask, 5.0, rng))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert (w[~mask] == 0).all() and (w[mask] > 0).all()
    # tau -> 0: the one-hot of argmax(theta + g) with the same Gumbel draw g (eq. 5)
    g = np.asarray(jax.random.gumbel(rng, theta.shape))
    hard = np.argmax(np.where(mask, np.asarray(theta) + g, -np.inf), -1)
    cold = np.asarray(search.mixing_weights(theta, mask, 1e-3, rng))
    np.testing.assert_allclose(cold, np.eye(len(CANDS))[hard], atol=1e-6)


def _subnet_variables(variables, specs, choices):
    """The supernet's weights of one path, renamed to MBConvNet(scan_blocks=False)'s layout."""
    params, stats = dict(variables['params']), dict(variables['batch_stats'])
    new_p = {k: params[k] for k in ('conv_stem', 'bn1', 'conv_head', 'bn2', 'head')}
    new_s = {k: stats[k] for k in ('bn1', 'bn2')}
    count = {}
    for l, (spec, k) in enumerate(zip(specs, choices)):
        name = CANDS[k]
        if name == 'skip':
            continue
        b = count.get(spec.stage, 0)
        count[spec.stage] = b + 1
        new_p.setdefault(f'blocks_{spec.stage}', {})[str(b)] = params[f'layer_{l}'][name]
        new_s.setdefault(f'blocks_{spec.stage}', {})[str(b)] = stats[f'layer_{l}'][name]
    return {'params': new_p, 'batch_stats': new_s}


def test_supernet_on_one_path_equals_the_exported_network():
    specs = search.layer_specs(SMALL_MACRO, 16, 32)
    supernet = search.SuperNet(SMALL_MACRO, CANDS, stem_width=16, num_features=64)
    mask = search.candidate_mask(specs, CANDS)
    x = _random(np.random.RandomState(2), (2, 32, 32, 1))
    variables = jit_once(supernet.init)(
        jax.random.key(1), x, search.mixing_weights(jnp.zeros(mask.shape), mask, 1.0)
    )
    # k5_e3 | k3_e6 (stride 2), skip | k3_e1 (stride 2)
    choices = [CANDS.index(n) for n in ('k5_e3', 'k3_e6', 'skip', 'k3_e1')]
    stages = search.choices_to_stages(specs, [CANDS[k] for k in choices])
    assert stages == (
        (Row('ir', 1, 5, 1, 3, 16),),
        (Row('ir', 1, 3, 2, 6, 24),),
        (Row('ir', 1, 3, 2, 1, 32),),
    )
    net = MBConvNet(
        stages,
        stem_width=16,
        num_features=64,
        head_scaling='fixed',
        act='relu',
        num_classes=10,
        scan_blocks=False,
    )
    subnet_variables = _subnet_variables(variables, specs, choices)
    expected = jit_once(lambda v, x: net.apply(v, x, train=False))(subnet_variables, x)
    got = jit_once(lambda v, x, w: supernet.apply(v, x, w, train=False))(
        variables, x, search.one_hot_weights(choices, len(CANDS))
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    'in_ch,size,out_ch,stride', [(16, 14, 16, 1), (24, 7, 32, 2), (32, 4, 64, 1)]
)
def test_flops_table_is_the_hand_count(in_ch, size, out_ch, stride):
    spec = search.LayerSpec(0, in_ch, size, out_ch, stride)
    out = (size + stride - 1) // stride
    for name in CANDS:
        cand = search.CANDIDATES[name]
        mid = in_ch * cand.exp
        assert cand.is_skip or make_divisible(mid) == mid  # widths where no rounding happens
        # 1x1 expand at the input size + kxk depthwise + 1x1 project at the output size
        hand = (
            0
            if cand.is_skip
            else (
                size * size * in_ch * mid
                + out * out * mid * cand.kernel**2
                + out * out * mid * out_ch
            )
        )
        assert search.candidate_macs(spec, cand) == hand, name
    table = search.cost_table([spec], CANDS, 'flops', unit=1.0)
    assert table[0, CANDS.index('k5_e6')] == search.candidate_macs(spec, search.CANDIDATES['k5_e6'])


def test_cost_term_pushes_theta_towards_cheaper_blocks():
    specs = search.layer_specs(SMALL_MACRO, 16, 32)
    mask = search.candidate_mask(specs, CANDS)
    table = jnp.asarray(search.cost_table(specs, CANDS, 'flops', unit=1e3))
    ce = 1.7  # cross-entropy held fixed

    def loss(theta, rng):
        m = search.mixing_weights(theta, mask, 2.0, rng)
        return search.search_loss(ce, search.expected_cost(m, table), 0.2, 0.6)

    grad = np.asarray(jax.grad(loss)(jnp.zeros(mask.shape), jax.random.key(0)))
    masked_table = np.where(mask, np.asarray(table), np.nan)
    cheapest, dearest = np.nanargmin(masked_table, 1), np.nanargmax(masked_table, 1)
    rows = np.arange(len(specs))
    assert (grad[rows, cheapest] < 0).all() and (grad[rows, dearest] > 0).all()
    assert (grad[~mask] == 0).all()
    # Adam on the cost alone ends on the cheapest allowed block of every layer
    tx = optax.adam(0.1)
    theta, state = jnp.zeros(mask.shape), tx.init(jnp.zeros(mask.shape))
    for i in range(100):
        g = jax.grad(loss)(theta, jax.random.key(i))
        updates, state = tx.update(g, state)
        theta = optax.apply_updates(theta, updates)
    assert search.argmax_choices(theta, mask) == list(cheapest)
    assert [CANDS[k] for k in cheapest] == ['skip', 'k3_e1', 'skip', 'k3_e1']


def test_fbnet_macro_and_fbnet_c_choices_give_the_fbnet_c_table():
    macro = search.FBNET_MACRO
    specs = search.layer_specs(macro.stages, macro.stem_width, 224)
    assert len(specs) == 22  # Table 1
    firsts = [0, 1, 5, 9, 13, 17, 21]  # each stage's first
    # Table 1's input column: 112^2 x 16, 112^2 x 16, 56^2 x 24, 28^2 x 32, 14^2 x 64, ...
    assert [(specs[l].in_size, specs[l].in_ch) for l in firsts] == [
        (112, 16),
        (112, 16),
        (56, 24),
        (28, 32),
        (14, 64),
        (14, 112),
        (7, 184),
    ]
    assert [specs[l].stride for l in firsts] == [1, 2, 2, 2, 1, 2, 1]
    assert specs[-1].out_ch == 352
    mask = search.candidate_mask(specs, CANDS)
    # skip is missing exactly where the shape changes: the first layer of stages 1-6
    assert [l for l in range(22) if not mask[l, CANDS.index('skip')]] == [1, 5, 9, 13, 17, 21]
    assert search.choices_to_stages(specs, FBNET_C_CHOICES) == FBNET_C
    # the searchable layers' MACs plus stem, head and classifier are fbnetc_100's
    from jaxcnn.summary import layer_costs

    searched = sum(
        search.candidate_macs(s, search.CANDIDATES[n]) for s, n in zip(specs, FBNET_C_CHOICES)
    )
    stem = 112 * 112 * 16 * 3 * 9
    head = 7 * 7 * 352 * 1984 + 7 * 7 * 1984 + 1984 * 1000  # 1x1 conv, average pool, fc
    total = sum(r.macs for r in layer_costs('fbnetc_100', 224))
    assert searched + stem + head == total


def _write_arch(path, stages, **model):
    with open(path, 'w') as f:
        json.dump(architecture_json(stages, **model), f)
    return str(path)


def test_exported_architecture_registers_with_the_hand_built_count(tmp_path):
    specs = search.layer_specs(SMALL_MACRO, 16, 28)
    stages = search.choices_to_stages(specs, ['k3_e3', 'k5_e6', 'k5_e6', 'k3_e1'])
    assert stages == (
        (Row('ir', 1, 3, 1, 3, 16),),
        (Row('ir', 2, 5, 2, 6, 24),),
        (Row('ir', 1, 3, 2, 1, 32),),
    )
    path = _write_arch(
        tmp_path / 'architecture.json', stages, stem_width=16, num_features=96, act='relu'
    )
    hand = MBConvNet(
        stages, stem_width=16, num_features=96, head_scaling='fixed', act='relu', num_classes=10
    )

    def count(model):
        shapes = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
        )
        return jaxcnn.count_params(shapes['params']), jax.tree.structure(shapes)

    n_hand, tree_hand = count(hand)
    name = 'fbnet_searched_test_only'
    try:
        assert search.register_searched(path, name) == name
        assert count(jaxcnn.create_model(name)) == (n_hand, tree_hand)
        assert jaxcnn.model_info(name).reference_params == n_hand
    finally:
        registry._REGISTRY.pop(name, None)
    # the trainer's route: the registered fbnet_searched with the file as an override
    routed = jaxcnn.create_model('fbnet_searched', num_classes=10, arch=path, drop_rate=0.0)
    assert count(routed) == (n_hand, tree_hand)
    assert routed.stages == stages and routed.num_features == 96
    with pytest.raises(FileNotFoundError, match='jaxcnn.search'):
        jaxcnn.create_model('fbnet_searched', arch=str(tmp_path / 'missing.json'))


def test_bad_settings_are_one_line_errors(capsys):
    for argv, word in [
        (['--config.search.alhpa=1'], 'alpha'),
        (['--config.batchsize=8'], 'batch_size'),
        (['--config.search.cost=energy'], 'flops'),
    ]:
        with pytest.raises(SystemExit) as e:
            config_lib.run_cli(
                lambda: search.main(['--config', 'fbnet_search_fmnist:smoke', *argv])
            )
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith('error:') and word in err[0], err


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
def test_an_empty_batch_is_one_line_error_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match='batch_size=0: a batch needs at least one example'):
        search.main(
            [
                '--config',
                'fbnet_search_fmnist:smoke',
                '--config.batch_size=0',
                '--workdir',
                str(tmp_path / 'search'),
            ]
        )
    assert not (tmp_path / 'search').exists()


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
def test_smoke_search_end_to_end_and_the_found_network_trains(tmp_path):
    from jaxcnn import train

    workdir = tmp_path / 'search'
    assert search.main(['--config', 'fbnet_search_fmnist:smoke', '--workdir', str(workdir)]) == 0
    arch = json.load(open(workdir / 'architecture.json'))
    with open(workdir / 'arch_weights.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    settings = search.search_settings(config_lib.load_config('fbnet_search_fmnist:smoke')[0])
    specs = search.layer_specs(settings['stages'], settings['stem_width'], 28)
    assert len(arch['choices']) == len(specs)
    assert stages_from_json(arch['stages']) == search.choices_to_stages(specs, arch['choices'])
    probs = np.asarray(arch['probabilities'])
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-4)
    results = json.load(open(workdir / 'results.json'))
    assert results['arch_steps'] > 0 and 0.0 <= results['supernet_test_accuracy'] <= 1.0
    assert (
        train.main(
            [
                '--config',
                'fbnet_search_fmnist:train_smoke',
                '--workdir',
                str(tmp_path / 'train'),
                f'--config.model_kwargs.arch={workdir / "architecture.json"}',
            ]
        )
        == 0
    )
    trained = json.load(open(tmp_path / 'train' / 'results.json'))
    assert trained['model'] == 'fbnet_searched' and trained['step'] == 4


def _saved_search(workdir):
    """The last checkpoint of a search, as saved (nested dicts of arrays)."""
    from jaxcnn import checkpoint as ckpt_lib

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
    try:
        return ckpt.latest_step(), ckpt.restore_arrays()
    finally:
        ckpt.close()


def _assert_same_arrays(a, b):
    """Bit-equal trees of arrays (typed PRNG keys compared by their key data)."""

    def same(x, y):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(x, y)

    jax.tree.map(same, a, b)


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
def test_a_search_preempted_and_run_again_ends_as_an_uninterrupted_one(tmp_path, capsys):
    # The smoke search without warm-up, so that the epoch it resumes from has trained theta
    # (and theta's Adam moments): 2 epochs of 3 weight + 3 architecture steps.
    def run(name, *overrides):
        return search.main(
            [
                '--config',
                'fbnet_search_fmnist:smoke',
                '--config.search.warmup_epochs=0',
                '--workdir',
                str(tmp_path / name),
                *overrides,
            ]
        )

    assert run('uninterrupted') == 0
    capsys.readouterr()
    # SIGTERM before weight step 4, the second of epoch 1: exit 0, epoch 0's checkpoint kept
    assert run('resumed', '--config.simulate_preemption_at_step=4') == 0
    out = capsys.readouterr().out
    assert 'Received SIGTERM' in out and 'after 1 of 2 epochs' in out, out
    assert not (tmp_path / 'resumed' / 'architecture.json').exists()
    assert _saved_search(tmp_path / 'resumed')[0] == 1
    assert run('resumed') == 0
    assert 'at epoch 1.' in capsys.readouterr().out

    (epochs_a, a), (epochs_b, b) = (
        _saved_search(tmp_path / name) for name in ('uninterrupted', 'resumed')
    )
    assert epochs_a == epochs_b == 2
    # the whole search state, bit for bit: the weights' TrainState (parameters, BatchNorm
    # statistics, SGD momentum, step, key) and theta with its Adam state
    assert int(a['arch']['step']) == 6 and int(a['weights']['step']) == 6
    _assert_same_arrays(a['weights'], b['weights'])
    _assert_same_arrays(a['arch'], b['arch'])
    arch_a, arch_b = (
        json.load(open(tmp_path / name / 'architecture.json'))
        for name in ('uninterrupted', 'resumed')
    )
    assert arch_a['theta'] == arch_b['theta'] and arch_a['choices'] == arch_b['choices']
    assert np.abs(np.asarray(arch_a['theta'])).max() > 0  # theta moved from its start
    # results.json: the same accuracies and per-epoch history (but for the seconds taken)
    res_a, res_b = (
        json.load(open(tmp_path / name / 'results.json')) for name in ('uninterrupted', 'resumed')
    )
    untimed = lambda history: [
        {k: v for k, v in r.items() if k != 'epoch_seconds'} for r in history
    ]
    assert len(res_a['history']) == 2
    assert untimed(res_a['history']) == untimed(res_b['history'])
    for key in (
        'supernet_test_accuracy',
        'argmax_path_test_accuracy',
        'weight_steps',
        'arch_steps',
    ):
        assert res_a[key] == res_b[key], key
