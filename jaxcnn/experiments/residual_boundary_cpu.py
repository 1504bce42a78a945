"""CPU training steps with and without ``layers.residual_output``'s boundary, timed in alternation.

    python -m jaxcnn.experiments.residual_boundary_cpu --out benchmarks/results/residual_boundary_cpu.json

For each model (name, batch, resolution) both steps are compiled (the switch
``layers.conv.CPU_MATERIALIZE_RESIDUALS`` is read while tracing), then timed in alternation,
4 rounds of 2 steps; the minimum per variant is reported. The bench's SGD step and the trainer's
XLA options.
"""
from jaxcnn import bench

CASES = (('resnet18', 32, 112), ('resnet18:stem=cifar', 128, 28), ('resnet50', 16, 112),
         ('resnet152', 16, 112), ('convnext_tiny', 16, 112))

if __name__ == '__main__':
    bench.switch_experiment(__spec__.name, __doc__, 'CPU_MATERIALIZE_RESIDUALS', CASES,
                            ('the boundary', 'no boundary'), rounds=4)
