"""GPU training steps with depthwise convolutions as cuDNN's grouped convolutions and as fused
per-tap sums, timed in alternation.

    python -m jaxcnn.experiments.depthwise_taps_gpu --out benchmarks/results/depthwise_taps_gpu.json

The three models with depthwise convolutions trained slower than timm on an H100 (BENCHMARKS.md,
GPU section); XLA derives a grouped convolution's kernel gradient as a convolution of dense size.
For each model (name, batch, resolution, bf16) both steps are compiled (the switch
``layers.conv.GPU_DEPTHWISE_TAPS`` is read while tracing), then timed in alternation, 3 rounds of
5 steps; the minimum per variant is reported, and the record is written after each model.
The bench's SGD step.
"""
import jax.numpy as jnp

from jaxcnn import bench

CASES = (('convnext_tiny', 256, 224), ('mobilenetv2_100', 256, 224), ('efficientnet_b0', 256, 224))

if __name__ == '__main__':
    bench.switch_experiment(__spec__.name, __doc__, 'GPU_DEPTHWISE_TAPS', CASES,
                            ('per-tap sums', 'grouped convolutions'), rounds=3, steps=5,
                            dtype=jnp.bfloat16)
