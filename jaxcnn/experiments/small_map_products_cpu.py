"""CPU training steps with dense convolutions on maps smaller than their kernel as one matrix
product and as XLA's convolutions, timed in alternation.

    python -m jaxcnn.experiments.small_map_products_cpu --out benchmarks/results/small_map_products_cpu.json

Such maps are the last stages of ImageNet networks run at low resolution: ResNets at 64 px end
on 2x2 maps, at 32 px on 1x1; VGG-16 at 32 px ends on 2x2. For each model (name, batch,
resolution) both steps are compiled (the switch ``layers.conv.CPU_SMALL_MAP_PRODUCTS`` is read
while tracing; each variant gets the XLA options the trainer would pick for it), then timed in
alternation, 3 rounds of 2 steps; the minimum per variant is reported. The bench's SGD step.
"""
from jaxcnn import bench

CASES = (('resnet18', 32, 64), ('resnet50', 16, 64), ('resnet18', 128, 32), ('vgg16', 32, 32))

if __name__ == '__main__':
    bench.switch_experiment(__spec__.name, __doc__, 'CPU_SMALL_MAP_PRODUCTS', CASES,
                            ('products', 'XLA convolutions'))
