"""CPU training steps with dense convolutions whose kernel mostly overlaps padding as one product
per kernel tap and as XLA's convolutions, timed in alternation.

    python -m jaxcnn.experiments.padded_taps_cpu --out benchmarks/results/padded_taps_cpu.json

A 3x3 convolution on a 4x4 map spends 31 % of its multiply-adds on zero padding, which XLA's
convolution computes and PyTorch's (oneDNN) leaves out; these maps end ResNets and VGG at 112 px.
For each model (name, batch, resolution) both steps are compiled (the switch
``layers.conv.CPU_PADDED_TAP_PRODUCTS`` is read while tracing; each variant gets the XLA options
the trainer would pick for it), then timed in alternation, 3 rounds of 2 steps; the minimum per
variant is reported. The bench's SGD step.
"""
from jaxcnn import bench

CASES = (('resnet18', 32, 112), ('resnet50', 16, 112), ('vgg16', 16, 64))

if __name__ == '__main__':
    bench.switch_experiment(__spec__.name, __doc__, 'CPU_PADDED_TAP_PRODUCTS', CASES,
                            ('tap products', 'XLA convolutions'))
