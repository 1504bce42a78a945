"""The README's commands are the ones CI and users actually run."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / 'README.md').read_text()
    blocks = re.findall(r'```(?:bash|sh)\n(.*?)```', text, re.S)
    return [line.strip() for block in blocks[:2] for line in block.splitlines()
            if line.strip() and not line.strip().startswith('#')]


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
    assert not missing, f'README model table lacks {missing}; regenerate with python -m jaxcnn.model_table'
