import os
import sys

# tests import their helpers as a plain module, and the benchmark scripts (benchmarks/, at the
# repository root) as the package ``benchmarks``
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The suite is dominated by XLA:CPU compiles of ~130 models. LLVM's -O1 instead of -O2 compiles
# about 25 % faster with the same numerics and, on these small inputs, the same run time. Set
# before jax starts; subprocesses (trainer CLIs, notebook kernels) inherit it.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + ' --xla_backend_optimization_level=1'
    ).strip()

# oneDNN's convolutions run on OpenMP threads, which by default spin for a while after each
# parallel region; with one pytest-xdist worker per core the spinning takes cores from the other
# worker. The tests time nothing, so their threads sleep at once instead.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
