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
    assert names == {'quickstart', 'data_parallel', 'nfnet_agc', 'reversible_memory',
                     'transfer_learning', 'architecture_comparison'}


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_cpu(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    # a CPU-only kernel: no accelerator plugin may claim the run
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    # of the test environment's XLA flags the kernel keeps only the suite's LLVM level (set in
    # conftest.py): compiles are most of a notebook's CPU run
    level = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if f.startswith('--xla_backend_optimization_level')]
    monkeypatch.setenv('XLA_FLAGS', ' '.join(level))
    client = NotebookClient(nb, timeout=900, kernel_name='python3',
                            resources={'metadata': {'path': str(tmp_path)}})
    client.execute()          # raises CellExecutionError, with the cell and traceback, on failure
    errors = [o for cell in nb.cells if cell.cell_type == 'code'
              for o in cell.get('outputs', []) if o.get('output_type') == 'error']
    assert not errors
