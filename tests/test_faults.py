"""Faults and bad input, as a user meets them: damaged checkpoints, Ctrl-C, finished runs,
unusable workdirs, broken config files, channels-first images, misfitting weight files, and
the command-line conventions. Each case checks the exit status, that the message is one line,
and that nothing already written is lost."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

import jaxcnn
from jaxcnn import checkpoint as ckpt_lib
from jaxcnn import config as config_lib
from jaxcnn import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.environ.get('JAXCNN_FMNIST_DIR', '/usr/share/datasets/fashion-mnist')
CACHE = os.path.join(tempfile.gettempdir(), 'jaxcnn_test_xla_cache')
jax.config.update('jax_compilation_cache_dir', CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
SMOKE = ['--config', 'default:smoke']
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}'
)
ENV = dict(
    os.environ,
    JAX_COMPILATION_CACHE_DIR=CACHE,
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
    PYTHONUNBUFFERED='1',
)


def cli(*argv):
    """Runs `python -m jaxcnn.train ARGV` in-process as the command line does: (status, stderr
    lines) through config.run_cli."""
    with pytest.raises(SystemExit) as e:
        config_lib.run_cli(lambda: train.main(list(argv)))
    return e.value.code


def one_line_error(capsys):
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith('error: '), err
    return err[0]


def files(workdir):
    return {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob('*') if p.is_file()}


def params_at(workdir, step):
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'))
    state = ckpt.restore_arrays(step)
    ckpt.close()
    return state['params']


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """8 steps of the smoke config (checkpoints at steps 4 and 8), uninterrupted."""
    workdir = tmp_path_factory.mktemp('finished')
    assert train.main([*SMOKE, '--workdir', str(workdir)]) == 0
    return workdir


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / 'run')
    return tmp_path / 'run'


# -- damaged checkpoints ------------------------------------------------------------------------


def damage(step_dir, kind):
    item = step_dir / 'default'
    if kind == 'a data file truncated':
        data = max((p for p in item.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
        with open(data, 'r+b') as f:
            f.truncate(data.stat().st_size // 3)
    elif kind == 'manifest.ocdbt missing':
        (item / 'manifest.ocdbt').unlink()
    elif kind == '_METADATA missing':
        (item / '_METADATA').unlink()
    elif kind == 'the step emptied':
        for p in item.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()


KINDS = ['a data file truncated', 'manifest.ocdbt missing', '_METADATA missing', 'the step emptied']


@needs_fmnist
@pytest.mark.parametrize('kind', KINDS)
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(finished, tmp_path, capsys, kind):
    run = copy_of(finished, tmp_path)
    (run / 'results.json').unlink()  # as if killed after the step-8 save
    damage(run / 'checkpoints' / '8', kind)
    assert cli(*SMOKE, '--workdir', str(run)) == 0
    out = capsys.readouterr().out
    told = [l for l in out.splitlines() if 'checkpoint step 8 does not read' in l]
    assert len(told) == 1 and 'resumed from step 4' in told[0], out
    assert {
        'a data file truncated': 'truncated',
        'manifest.ocdbt missing': 'manifest.ocdbt is missing',
        '_METADATA missing': '_METADATA is missing',
        'the step emptied': 'is missing',
    }[kind] in told[0]
    assert 'Traceback' not in out
    # the damaged one is kept aside, the run redid steps 5-8 exactly as the first time
    assert (run / 'checkpoints' / '8.corrupt').is_dir()
    jax.tree.map(np.testing.assert_array_equal, params_at(finished, 8), params_at(run, 8))


@needs_fmnist
def test_when_no_checkpoint_reads_one_line_says_what_to_do_and_nothing_moves(
    finished, tmp_path, capsys
):
    run = copy_of(finished, tmp_path)
    for step in ('4', '8'):
        damage(run / 'checkpoints' / step, 'manifest.ocdbt missing')
    before = files(run)
    assert cli(*SMOKE, '--workdir', str(run)) == 2
    line = one_line_error(capsys)
    assert 'no checkpoint' in line and 'step 8' in line and 'step 4' in line and 'backup' in line
    assert files(run) == before


# -- interrupts ---------------------------------------------------------------------------------


def start_training(workdir, *overrides):
    return subprocess.Popen(
        [
            sys.executable,
            '-m',
            'jaxcnn.train',
            *SMOKE,
            '--workdir',
            str(workdir),
            '--config.num_steps=100000',
            '--config.checkpoint_every_steps=50000',
            *overrides,
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_rows(proc, metrics, rows, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return
        time.sleep(0.1)
    raise AssertionError(f'no {rows} metric rows in {timeout} s: {proc.communicate()[0]}')


@needs_fmnist
def test_ctrl_c_saves_and_exits_130_and_the_run_resumes(tmp_path):
    proc = start_training(tmp_path)
    wait_for_rows(proc, tmp_path / 'metrics.jsonl', 3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert 'Traceback' not in out and 'KeyboardInterrupt' not in out, out
    saved = int(out.split('saved a checkpoint at step ')[1].split()[0])
    assert os.listdir(tmp_path / 'checkpoints') == [str(saved)]
    rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert max(r['step'] for r in rows) == saved  # the metrics up to the save are kept
    assert ckpt_lib.train_seconds(str(tmp_path), saved) > 0


@needs_fmnist
def test_ctrl_c_on_one_of_two_processes_saves_the_same_step_on_both(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in ENV.items() if k != 'XLA_FLAGS'}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                '-m',
                'jaxcnn.train',
                *SMOKE,
                '--workdir',
                str(tmp_path),
                '--config.num_steps=100000',
                '--config.checkpoint_every_steps=50000',
                '--config.distributed=true',
                f'--config.coordinator_address=127.0.0.1:{port}',
                '--config.num_processes=2',
                f'--config.process_id={i}',
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    wait_for_rows(procs[0], tmp_path / 'metrics.jsonl', 3)
    procs[1].send_signal(signal.SIGINT)  # the Ctrl-C reaches one process only
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [130, 130], outs
    saved = int(outs[0].split('saved a checkpoint at step ')[1].split()[0])
    assert os.listdir(tmp_path / 'checkpoints') == [str(saved)]
    assert all('Traceback' not in o for o in outs), outs


def test_a_second_ctrl_c_exits_at_once():
    """While the loop finishes its step and saves, a second Ctrl-C ends the process there (the
    handler the trainer installs, in a process of its own)."""
    code = (
        'import os, signal, time\n'
        'from jaxcnn.checkpoint import StopSignal\n'
        'stop = StopSignal()\n'
        'os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n'
        'assert stop.received == "SIGINT"\n'
        'os.kill(os.getpid(), signal.SIGINT); time.sleep(10)\n'
        'print("still running")\n'
    )
    proc = subprocess.run(
        [sys.executable, '-c', code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 130, proc
    assert 'still running' not in proc.stdout and 'Traceback' not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.strip()][-1].startswith('Second Ctrl-C')


@needs_fmnist
def test_ctrl_c_before_training_is_one_line(tmp_path):
    proc = start_training(tmp_path)
    deadline = time.time() + 120
    line = ''
    while time.time() < deadline and 'device(s)' not in line:  # the first log line
        line = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest
    if 'saved a checkpoint' not in rest:  # the loop had not started yet
        assert 'interrupted before training started' in rest and 'Traceback' not in rest, rest


# -- nothing overwritten ------------------------------------------------------------------------


@needs_fmnist
def test_a_finished_run_says_so_and_touches_nothing(finished, tmp_path, capsys):
    run = copy_of(finished, tmp_path)
    before = files(run)
    assert cli(*SMOKE, '--workdir', str(run)) == 0
    out = capsys.readouterr().out
    assert 'finished run' in out and 'num_steps' in out, out
    assert files(run) == before


@needs_fmnist
def test_a_resumed_run_keeps_one_row_per_step_and_the_whole_training_time(
    finished, tmp_path, capsys
):
    run = copy_of(finished, tmp_path)
    # killed between the step-4 checkpoint and step 8: rows 5-8 were written, checkpoint 8 not
    shutil.rmtree(run / 'checkpoints' / '8')
    (run / 'results.json').unlink()
    first_part = ckpt_lib.train_seconds(str(run), 4)
    assert first_part > 0
    t0 = time.time()
    assert cli(*SMOKE, '--workdir', str(run)) == 0
    second_part = time.time() - t0
    rows = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
    keys = [(r['kind'], r['step']) for r in rows]
    assert len(keys) == len(set(keys)), keys
    reference = [json.loads(l) for l in (finished / 'metrics.jsonl').read_text().splitlines()]
    assert [r['loss'] for r in rows if r['kind'] == 'train'] == [
        r['loss'] for r in reference if r['kind'] == 'train'
    ]
    total = json.load(open(run / 'results.json'))['train_seconds']
    assert first_part < total < first_part + second_part


@pytest.mark.parametrize('case', ['an existing file', 'not writable', 'a full disk'])
def test_an_unusable_workdir_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, case):
    if case == 'an existing file':
        workdir = tmp_path / 'run'
        workdir.write_text('my notes')
    elif case == 'not writable':
        workdir = tmp_path / 'ro' / 'run'
        (tmp_path / 'ro').mkdir()
        real_makedirs = os.makedirs

        def read_only(path, *a, **k):  # as on a read-only filesystem (root ignores chmod)
            if str(path).startswith(str(tmp_path / 'ro')):
                raise OSError(30, 'Read-only file system', str(path))
            return real_makedirs(path, *a, **k)

        monkeypatch.setattr(os, 'makedirs', read_only)
    else:
        workdir = tmp_path / 'run'
        monkeypatch.setattr(
            shutil, 'disk_usage', lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20)
        )
    monkeypatch.setattr(train, 'load_data', lambda *a: pytest.fail('work started'))
    assert cli(*SMOKE, '--workdir', str(workdir)) == 2
    line = one_line_error(capsys)
    assert (
        str(workdir) in line
        and {
            'an existing file': 'existing file',
            'not writable': 'Read-only',
            'a full disk': 'MiB free',
        }[case]
        in line
    ), line
    if case == 'an existing file':
        assert workdir.read_text() == 'my notes'


# -- config files and the command line -----------------------------------------------------------


@pytest.mark.parametrize(
    'body, line, what',
    [
        (
            'from jaxcnn.config import base_config\n\ndef get_config(arg=None)\n  return base_config()\n',
            3,
            'syntax error',
        ),
        (
            'from jaxcnn.config import base_config\n\ndef get_config(arg=None):\n  c = base_config()\n'
            '  c.model = resnet20\n  return c\n',
            5,
            'NameError',
        ),
    ],
)
def test_a_broken_config_file_is_one_line_naming_the_file_and_line(
    tmp_path, capsys, body, line, what
):
    path = tmp_path / 'mine.py'
    path.write_text(body)
    assert cli('--config', str(path), '--workdir', str(tmp_path / 'run')) == 2
    err = one_line_error(capsys)
    assert f'{path}:{line}' in err and what in err, err
    assert not (tmp_path / 'run').exists()


def test_help_exits_zero_on_every_command():
    commands = [
        'jaxcnn.train',
        'jaxcnn.search',
        'jaxcnn.lr_find',
        'jaxcnn.summary',
        'jaxcnn.bench',
        'jaxcnn.model_table',
        'jaxcnn.signal_prop',
        'jaxcnn.predict',
    ]
    procs = {
        c: subprocess.Popen(
            [sys.executable, '-m', c, '--help'],
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for c in commands
    }
    for c, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (c, err)
        assert 'usage' in out.lower(), (c, out)


def test_import_jaxcnn_exposes_every_documented_submodule_without_torch_or_tensorflow():
    code = (
        'import sys, jaxcnn\n'
        'for name in ("convert", "transfer", "summary", "data", "layers", "models", "kernels", "optim"):\n'
        '  assert getattr(jaxcnn, name).__name__ == "jaxcnn." + name\n'
        'assert callable(jaxcnn.convert.from_torch)\n'
        'heavy = [m for m in ("torch", "tensorflow") if m in sys.modules]\n'
        'assert not heavy, heavy\n'
    )
    proc = subprocess.run(
        [sys.executable, '-c', code],
        cwd=tempfile.gettempdir(),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(AttributeError, match='no attribute'):
        jaxcnn.no_such_module


# -- input that does not fit --------------------------------------------------------------------


def two_class_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(('ant', 'bee')):
        (root / name).mkdir(parents=True)
        for i in range(40):
            pixels = rng.integers(0, 100, (12, 12, 3)) + 120 * k  # bees are brighter
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f'{i}.png')
    return root


def test_the_dataset_decides_the_number_of_classes_unless_the_config_says(tmp_path, capsys):
    folder = two_class_folder(tmp_path / 'imgs')
    data = [
        '--config.dataset',
        f'folder:{folder}',
        '--config.image_size=12',
        '--config.test_image_size=12',
        '--config.batch_size=8',
        '--config.num_steps=2',
        '--config.train_subset=0',
        '--config.test_subset=0',
    ]
    assert cli(*SMOKE, *data, '--workdir', str(tmp_path / 'a')) == 0
    assert json.load(open(tmp_path / 'a' / 'config.json'))['num_classes'] == 2
    assert params_at(tmp_path / 'a', 2)['head']['fc']['kernel'].shape[-1] == 2
    capsys.readouterr()
    assert cli(*SMOKE, *data, '--config.num_classes=10', '--workdir', str(tmp_path / 'b')) == 2
    line = one_line_error(capsys)
    assert 'num_classes=10' in line and 'has 2 classes' in line, line
    assert not (tmp_path / 'b' / 'checkpoints').exists()


@pytest.mark.parametrize('name', jaxcnn.list_models())
def test_channels_first_images_are_one_line_for_every_model(name):
    info = jaxcnn.model_info(name)
    size = max(info.input_size[0], info.min_input)
    model = jaxcnn.create_model(name)
    x = jax.ShapeDtypeStruct((1, info.input_size[2], size, size), np.float32)
    with pytest.raises(ValueError, match='channels-first') as e:
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    assert '\n' not in str(e.value) and 'transpose(0, 2, 3, 1)' in str(e.value)


def test_a_weight_file_of_another_architecture_names_the_shapes_and_the_architecture():
    torchvision = pytest.importorskip('torchvision')
    state_dict = torchvision.models.resnet18().state_dict()
    with pytest.raises(ValueError) as e:
        jaxcnn.convert.from_torch('resnet50', state_dict)
    message = str(e.value)
    assert '\n' not in message
    assert 'of another shape' in message and 'layer2.0.downsample.1.running_mean (128,)' in message
    assert "looks like resnet18's weights" in message


# -- progress and plots -------------------------------------------------------------------------


@needs_fmnist
def test_progress_off_a_terminal_is_plain_lines_apart_from_log_lines(tmp_path, capsys):
    assert (
        cli(
            *SMOKE,
            '--config.progress=true',
            '--config.log_every_steps=2',
            '--workdir',
            str(tmp_path),
        )
        == 0
    )
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    progress = [l for l in lines if l.startswith('step ') and 'img/s' in l]
    assert [l.split()[1] for l in progress] == ['2/8', '4/8', '6/8', '8/8'], lines
    assert not [l for l in lines if 'img/s' in l and ('test ' in l or 'saved' in l)], (
        lines
    )  # unglued
    assert '\r' not in captured.out + captured.err  # no bar redraws in a file


def test_plots_say_what_they_show(tmp_path, monkeypatch):
    import matplotlib.figure
    from jaxcnn import metrics

    path = tmp_path / 'metrics.jsonl'
    rows = [
        {'step': s, 'kind': 'train', 'loss': 2.0 / s, 'accuracy': 0.1 * s, 'lr': 0.1}
        for s in range(1, 21)
    ]
    rows += [
        {'step': s, 'kind': 'eval', 'loss': 0.5, 'accuracy': a} for s, a in ((10, 0.6), (20, 0.8))
    ]
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    figures = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def keep(fig, fname, *a, **k):
        figures[os.path.basename(fname)] = fig.axes[0]
        return real_savefig(fig, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', keep)
    metrics.plot_metrics(str(path), str(tmp_path), steps_per_epoch=10, label_smoothing=0.1)
    loss, acc = figures['loss.png'], figures['accuracy.png']
    assert loss.get_xlabel() == acc.get_xlabel() == 'epoch'
    labels = [t.get_text() for t in loss.get_legend().get_texts()]
    assert 'label smoothing 0.1' in labels[0] and labels[1].startswith('test loss'), labels
    test_acc = [l for l in acc.lines if l.get_label() == 'test accuracy'][0]
    assert test_acc.get_linestyle() == 'None' and test_acc.get_marker() == 'o'
    np.testing.assert_allclose(test_acc.get_xdata(), [1.0, 2.0])  # steps 10 and 20 = epochs 1, 2
    np.testing.assert_allclose(acc.lines[0].get_xdata()[:2], [0.1, 0.2])
