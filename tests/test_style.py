"""One code style across the package: `ruff format` and `ruff check`, configured in
pyproject.toml, must leave every tracked Python file as it is."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff(*args):
    return subprocess.run(
        [sys.executable, '-m', 'ruff', *args], cwd=ROOT, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    'args', [('format', '--check', '.'), ('check', '.')], ids=['format', 'lint']
)
def test_ruff_keeps_the_package_style(args):
    result = _ruff(*args)
    assert result.returncode == 0, (
        f'`ruff {" ".join(args)}` found files out of style; run `ruff format . && ruff check --fix .`'
        f'\n{result.stdout}{result.stderr}'
    )


def test_ruff_sees_a_file_out_of_style(tmp_path):
    # The two checks above are only worth something if ruff reads this project's settings.
    bad = tmp_path / 'bad.py'
    bad.write_text('import os\ndef f( x ):\n  return x\n')
    fmt = _ruff('format', '--check', '--config', str(ROOT / 'pyproject.toml'), str(bad))
    lint = _ruff('check', '--config', str(ROOT / 'pyproject.toml'), str(bad))
    assert fmt.returncode == 1 and 'bad.py' in fmt.stdout
    assert lint.returncode == 1 and 'F401' in lint.stdout
