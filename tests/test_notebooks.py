"""Every notebook in colab/ runs top to bottom on a CPU (its small settings), headless."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / 'colab').glob('*.ipynb'))
FMNIST = os.environ.get('JAXCNN_FMNIST_DIR', '/usr/share/datasets/fashion-mnist')


def test_the_six_notebooks_exist():
    names = {p.stem.split('_', 1)[1] for p in NOTEBOOKS}
    assert names == {
        'quickstart',
        'data_parallel',
        'nfnet_agc',
        'reversible_memory',
        'transfer_learning',
        'architecture_comparison',
    }


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_cpu(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    # a CPU-only kernel: no accelerator plugin may claim the run
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    # of the test environment's XLA flags the kernel keeps only the suite's LLVM level (set in
    # conftest.py): compiles are most of a notebook's CPU run
    level = [
        f
        for f in os.environ.get('XLA_FLAGS', '').split()
        if f.startswith('--xla_backend_optimization_level')
    ]
    monkeypatch.setenv('XLA_FLAGS', ' '.join(level))
    client = NotebookClient(
        nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on failure
    errors = [
        o
        for cell in nb.cells
        if cell.cell_type == 'code'
        for o in cell.get('outputs', [])
        if o.get('output_type') == 'error'
    ]
    assert not errors


def install_cell(path):
    nb = nbformat.read(path, as_version=4)
    return next(
        c.source for c in nb.cells if c.cell_type == 'code' and 'JAXCNN_PIP_SPEC' in c.source
    )


def test_the_install_cell_installs_a_wheel_built_from_the_checkout(tmp_path):
    """The notebooks' first code cell, run where jaxcnn is missing (a bare virtual environment):
    without a spec it says in one line what to set; with a wheel built from this checkout it
    installs it (dependencies left out: the bare environment has no package index)."""
    import subprocess
    import sys

    cells = {install_cell(p) for p in NOTEBOOKS}
    assert len(cells) == 1  # one install cell, the same in every notebook
    cell = cells.pop()
    wheels = tmp_path / 'wheels'
    subprocess.run(
        [
            sys.executable,
            '-m',
            'pip',
            'wheel',
            '-q',
            '--no-deps',
            '--no-build-isolation',
            '-w',
            str(wheels),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    wheel = next(wheels.glob('jaxcnn-*.whl'))
    subprocess.run([sys.executable, '-m', 'venv', str(tmp_path / 'venv')], check=True)
    python = str(tmp_path / 'venv' / 'bin' / 'python')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('JAXCNN_PIP_SPEC', 'PYTHON'))}
    missing = subprocess.run(
        [python, '-c', cell], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert missing.returncode != 0
    assert (
        missing.stderr.strip()
        .splitlines()[-1]
        .startswith('jaxcnn is not installed here: set JAXCNN_PIP_SPEC')
    )
    installed = subprocess.run(
        [python, '-c', cell],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(env, JAXCNN_PIP_SPEC=str(wheel), PIP_NO_DEPS='1', PIP_NO_INDEX='1'),
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    version = subprocess.run(
        [python, '-c', 'import importlib.metadata as m; print(m.version("jaxcnn"))'],
        capture_output=True,
        text=True,
        env=env,
    )
    assert version.stdout.strip() == '0.1.0', version
