"""Config resolution: names, arguments, paths, overrides, and the errors for bad input."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import pytest

from jaxcnn import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bare_name_and_arg():
    config, name = config_lib.load_config('default')
    assert name == 'default' and config.model == 'resnet20' and config.dataset == 'fmnist'
    smoke, name = config_lib.load_config('default:smoke')
    assert name == 'default_smoke'
    assert smoke.batch_size < config.batch_size and smoke.num_steps > 0


def test_no_config_means_default_and_workdir_follows_name():
    config, name, workdir, _ = config_lib.parse_args([])
    assert name == 'default' and workdir == os.path.join('workdirs', 'default')
    assert config.to_dict() == config_lib.load_config('default')[0].to_dict()
    _, _, workdir, _ = config_lib.parse_args(['--config', 'nfnet_f0:fmnist', '--workdir=/x/y'])
    assert workdir == '/x/y'


def test_config_file_path_with_arg(tmp_path):
    path = tmp_path / 'mine.py'
    path.write_text(
        textwrap.dedent('''
      import ml_collections
      def get_config(arg=None):
        return ml_collections.ConfigDict(dict(model='m', size=int(arg or 1)))
  ''')
    )
    config, name = config_lib.load_config(f'{path}:7')
    assert (config.model, config.size, name) == ('m', 7, 'mine_7')


def test_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # No ./configs here: falls back to the repository's.
    config, _ = config_lib.load_config('cifar_resnet56')
    assert config.model == 'resnet56'


def test_overrides_are_typed():
    config, _, _, _ = config_lib.parse_args(
        [
            '--config',
            'default',
            '--config.optim.lr=0.3',
            '--config.bf16=true',
            '--config.num_steps=1e3',
            '--config.eval.scales=(1.0, 1.25)',
            '--config.model',
            'resnet56',
            '--config.augment.flip=0',
            '--config.num_epochs=2',
        ]
    )
    assert config.optim.lr == 0.3 and config.bf16 is True
    assert config.num_steps == 1000 and isinstance(config.num_steps, int)
    assert config.eval.scales == (1.0, 1.25)
    assert config.model == 'resnet56' and config.augment.flip is False
    assert config.num_epochs == 2.0 and isinstance(config.num_epochs, float)
    # Model arguments are free-form: new keys are accepted there (and typed as literals).
    config, _, _, _ = config_lib.parse_args(
        ['--config.model_kwargs.drop_path_rate=0.1', '--config.model_kwargs.stem=cifar']
    )
    assert config.model_kwargs.drop_path_rate == 0.1 and config.model_kwargs.stem == 'cifar'


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert '\n' not in msg, msg
    return msg


def test_unknown_config_name_suggests_closest():
    with pytest.raises(ValueError) as e:
        config_lib.load_config('cifar_resnet65')
    msg = _one_line(e)
    assert "'cifar_resnet65'" in msg and 'cifar_resnet56' in msg


def test_unknown_key_suggests_closest():
    with pytest.raises(ValueError) as e:
        config_lib.parse_args(['--config.optim.lrr=1'])
    msg = _one_line(e)
    assert 'optim.lrr' in msg and 'optim.lr' in msg
    with pytest.raises(ValueError) as e:
        config_lib.parse_args(['--config.batchsize=64'])
    assert 'batch_size' in _one_line(e)


def test_bad_value_and_bad_flag():
    with pytest.raises(ValueError) as e:
        config_lib.parse_args(['--config.batch_size=abc'])
    assert 'integer' in _one_line(e)
    with pytest.raises(ValueError) as e:
        config_lib.parse_args(['--config.batch_size=1.5'])
    assert 'integer' in _one_line(e)
    with pytest.raises(ValueError) as e:
        config_lib.parse_args(['--wokdir', '/tmp/x'])
    assert '--workdir' in _one_line(e)
    with pytest.raises(ValueError) as e:
        config_lib.parse_args(['--config.optim=3'])
    assert 'group' in _one_line(e)


def test_duration_in_steps_or_epochs():
    c = ml_collections.ConfigDict(
        dict(num_steps=-1, num_epochs=2.5, eval_every_steps=7, eval_every_epochs=1.0)
    )
    assert config_lib.duration_steps(c, 'num', 100) == 250
    assert config_lib.duration_steps(c, 'eval_every', 100) == 7  # steps win
    c.num_steps = 42
    assert config_lib.duration_steps(c, 'num', 100) == 42
    assert config_lib.duration_steps(c, 'missing', 100, default=5) == 5
    c.num_epochs, c.num_steps = 0.001, -1
    assert config_lib.duration_steps(c, 'num', 100) == 1  # rounds up, never 0


@pytest.mark.parametrize('name', config_lib.available_configs())
def test_every_config_uses_only_schema_keys(name):
    """A typo in a config file would silently be ignored: every key must be in the schema."""
    schema = set(config_lib.flat_keys(config_lib.base_config()))
    for arg in (None, 'smoke'):
        config, _ = config_lib.load_config(f'{name}:{arg}' if arg else name)
        # model_kwargs go to the model, search to jaxcnn.search: each checks its own keys
        keys = {
            k
            for k in config_lib.flat_keys(config)
            if not k.startswith(('model_kwargs.', 'search.'))
        }
        assert keys <= schema, sorted(keys - schema)
    with pytest.raises(ValueError):
        config_lib.load_config(f'{name}:no_such_arg')


def test_integer_options_parse_and_name_the_bound():
    import argparse

    assert config_lib.integer_at_least(0)('0') == 0
    assert config_lib.integers_at_least(1)('1, 2,64,') == [1, 2, 64]
    for parse, text, message in [
        (config_lib.integer_at_least(1), '0', 'must be at least 1, got 0'),
        (config_lib.integer_at_least(1), '2.5', "expected an integer, got '2.5'"),
        (config_lib.integers_at_least(1), '4,-1', 'must be at least 1, got -1'),
        (config_lib.integers_at_least(1), ' ', 'expected comma-separated'),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_cli_reports_one_line_and_exit_code_2():
    proc = subprocess.run(
        [sys.executable, '-m', 'jaxcnn.train', '--config', 'defualt'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'default' in lines[0], proc.stderr


def test_a_plain_pip_install_ships_the_configs(tmp_path):
    """A non-editable install (as on Colab) carries every config and every subpackage: the
    installed copy, run from a directory without configs/, loads the default recipe."""
    target = tmp_path / 'site'
    subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'install',
            '-q',
            '--no-deps',
            '--no-build-isolation',
            '--target',
            str(target),
            REPO,
        ],
        check=True,
        capture_output=True,
    )
    shipped = sorted(p.stem for p in (target / 'jaxcnn' / 'configs').glob('*.py'))
    assert shipped == sorted(p.stem for p in Path(REPO, 'configs').glob('*.py'))
    packages = sorted(
        str(p.parent.relative_to(REPO)) for p in Path(REPO, 'jaxcnn').rglob('__init__.py')
    )
    assert all((target / p / '__init__.py').is_file() for p in packages), packages
    code = (
        'import jaxcnn.config as c; cfg, name = c.load_config("default"); '
        'print(c.find_config_file("default").parent.parent.name, name, cfg.model)'
    )
    out = subprocess.run(
        [sys.executable, '-c', code],
        cwd=tmp_path,
        check=True,
        text=True,
        capture_output=True,
        env={**os.environ, 'PYTHONPATH': str(target)},
    ).stdout
    assert out.split() == ['jaxcnn', 'default', config_lib.load_config('default')[0].model]
