"""CPU training steps with dense convolutions through oneDNN and through XLA's own (Eigen's)
kernels, timed in alternation.

    python -m jaxcnn.experiments.onednn_conv_cpu --out benchmarks/results/onednn_conv_cpu.json

XLA:CPU runs convolutions with Eigen's kernels; ``layers.onednn`` runs dense float32 ones with
oneDNN's, which PyTorch's CPU convolutions use too. For each model (name, batch, resolution) both
steps are compiled (the switch ``layers.conv.CPU_ONEDNN_CONVOLUTIONS`` is read while tracing;
off, the step takes XLA's convolutions with the CPU forms that stand in for some of them), then
timed in alternation, 3 rounds of 2 steps; the minimum per variant is reported. The bench's SGD
step. ``resnet20`` at 28 px, batch 128, is near the default Fashion-MNIST recipe's shape.
"""
from jaxcnn import bench

CASES = (('resnet18', 32, 112), ('resnet50', 16, 112), ('vgg16', 16, 64),
         ('resnet20', 128, 28))

if __name__ == '__main__':
    bench.switch_experiment(__spec__.name, __doc__, 'CPU_ONEDNN_CONVOLUTIONS', CASES,
                            ('oneDNN convolutions', 'XLA convolutions'))
