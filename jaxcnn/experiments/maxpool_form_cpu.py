"""ResNet-18's CPU training step with jaxcnn's max-pool gradient form and with nn.max_pool's.

    python -m jaxcnn.experiments.maxpool_form_cpu --out benchmarks/results/maxpool_form_cpu.json

Batch 32, 112 px, the bench's SGD step and the trainer's XLA options; both steps are compiled
(the switch ``layers.conv.CPU_GRADIENT_FORMS`` is read while tracing; at this size it changes
only the max-pool) and timed in alternation (4 rounds of 3 steps); the minimum per variant is
reported.
"""
from jaxcnn import bench

if __name__ == '__main__':
    bench.switch_experiment(__spec__.name, __doc__, 'CPU_GRADIENT_FORMS', (('resnet18', 32, 112),),
                            ('the max-pool form', 'nn.max_pool'), rounds=4, steps=3)
