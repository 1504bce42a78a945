"""The README's commands are the ones CI and users actually run."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / 'README.md').read_text()
    blocks = re.findall(r'```(?:bash|sh)\n(.*?)```', text, re.S)
    return [
        line.strip()
        for block in blocks[:2]
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith('#')
    ]


def test_readme_opens_with_the_two_commands():
    main, test = readme_commands()[:2]
    assert 'python -m jaxcnn.train' in main and 'pip install' in main
    assert 'pytest' in test and 'pip install' in test


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / '.ci' / 'run').read_text().strip().splitlines()[-1].strip()
    assert ci == readme_commands()[1]


def test_model_table_command_prints_matching_rows_and_rejects_a_pattern_matching_none(capsys):
    from jaxcnn import model_table

    assert model_table.main(['lenet*']) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| `')]
    assert rows and all(line.startswith('| `lenet') for line in rows)
    with pytest.raises(ValueError, match=r"no registered model matches 'resnt\*'"):
        model_table.main(['resnt*'])


def test_model_table_lists_every_registered_model():
    import jaxcnn

    text = (ROOT / 'README.md').read_text()
    missing = [n for n in jaxcnn.list_models() if f'| `{n}` |' not in text]
    assert not missing, (
        f'README model table lacks {missing}; regenerate with python -m jaxcnn.model_table'
    )


def test_readme_commands_install_into_a_virtual_environment():
    # A Debian 12 / Ubuntu 24.04 system Python refuses `pip install` (PEP 668): every pip and
    # python after the set-up must run inside the environment that the command creates.
    for command in readme_commands()[:2]:
        setup, _, rest = command.partition('pip install')
        assert 'python3 -m venv' in setup and '. .venv/bin/activate' in setup, command
        assert 'python3-venv' in setup.split('python3 -m venv')[0], command  # apt provides venv


def test_readme_main_command_installs_and_starts_the_trainer(tmp_path):
    # The first command as written, in a copy of the checkout, with the trainer asked for its
    # usage rather than a full run; apt is skipped where the packages are present, as here. The
    # build is isolated, as a user's is: the setuptools that a new venv bundles (65 on Python
    # 3.11) cannot build an editable wheel without the `wheel` package.
    import shutil
    import subprocess

    files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True)
    assert files.returncode == 0, 'the tests run from a git checkout of jaxcnn'
    copy = tmp_path / 'jaxcnn'
    for name in files.stdout.split():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, copy / name)
    command = readme_commands()[0]
    assert command.endswith('python -m jaxcnn.train')
    command = command.replace('pip install -e .', 'pip install -q -e .')
    result = subprocess.run(
        ['bash', '-c', f'set -euo pipefail; {command} --help; which python'],
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert 'usage: python -m jaxcnn.train' in result.stdout
    assert result.stdout.strip().splitlines()[-1] == str(copy / '.venv' / 'bin' / 'python')
