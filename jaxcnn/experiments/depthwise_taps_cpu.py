"""CPU training steps with depthwise convolutions as fused per-tap sums and as XLA's grouped
convolutions, timed in alternation.

    python -m jaxcnn.experiments.depthwise_taps_cpu --out benchmarks/results/depthwise_taps_cpu.json

For each model (name, batch, resolution) both steps are compiled (the switch
``layers.conv.CPU_DEPTHWISE_TAPS`` is read while tracing; each variant gets the XLA options the
trainer would pick for it), then timed in alternation, 3 rounds of 2 steps; the minimum per
variant is reported. The bench's SGD step.
"""
from jaxcnn import bench

CASES = (('mobilenetv2_100', 32, 112), ('efficientnet_b0', 32, 112), ('convnext_tiny', 16, 112),
         ('mobilenetv3_large_100', 32, 112))

if __name__ == '__main__':
    bench.switch_experiment(__spec__.name, __doc__, 'CPU_DEPTHWISE_TAPS', CASES,
                            ('per-tap sums', 'grouped convolutions'))
