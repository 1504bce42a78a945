"""FLOPs of a step, counted without running it, and the device peaks that MFU divides by."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp

from jaxcnn import kernels

# Dense peak FLOP/s per device by compute dtype (vendor data sheets; fp32 on NVIDIA GPUs is
# TF32 tensor-core math, XLA's default for fp32 matmuls and convolutions there).
PEAK_FLOPS = {
    'H100': {'bfloat16': 989e12, 'float32': 494e12},
    'H200': {'bfloat16': 989e12, 'float32': 494e12},
    'A100': {'bfloat16': 312e12, 'float32': 156e12},
    'V100': {'bfloat16': 125e12, 'float32': 15.7e12},
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},
    'TPU v5p': {'bfloat16': 459e12, 'float32': 459e12},
}


def peak_flops(device, dtype) -> float | None:
    """The device's dense peak for ``dtype``, or None when unknown (e.g. a CPU)."""
    kind = getattr(device, 'device_kind', '')
    for key, peaks in PEAK_FLOPS.items():
        if key.lower() in kind.lower():
            return peaks[jnp.dtype(dtype).name if jnp.dtype(dtype).name in peaks else 'float32']
    return None


def count_flops(fn, args) -> float:
    """FLOPs of one call of ``fn(*args)``: the model FLOPs of MFU, the plain lax program (traced
    under the plain kernel policy, whatever forms a backend's policy picks), from XLA's cost
    analysis of the program lowered for the CPU, before optimisation, with every loop body
    counted as often as it runs. (The same analysis on a GPU counts nothing for convolutions,
    which become cuDNN calls, so the count is taken on the host whatever the device; and it
    counts a loop body once, so scanned blocks' further runs are added from the jaxpr's scan
    lengths.)"""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args)
    with kernels.use(kernels.PLAIN):
        return _xla_flops(fn, shapes) + _uncounted_loop_flops(
            jax.make_jaxpr(fn)(*shapes).jaxpr, cpu
        )


def _xla_flops(fn, shapes) -> float:
    cost = jax.jit(fn).lower(*shapes).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', 0.0)) if cost else 0.0


def _uncounted_loop_flops(jaxpr, sharding) -> float:
    """What the cost analysis of ``jaxpr``'s program leaves out: each scan body's runs after the
    first, and on every run whatever the body's own loops leave out."""
    missing = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'scan':
            body, length = eqn.params['jaxpr'], eqn.params['length']
            shapes = [
                jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in body.in_avals
            ]
            once = _xla_flops(jax.extend.core.jaxpr_as_fun(body), shapes)
            missing += (length - 1) * once + length * _uncounted_loop_flops(body.jaxpr, sharding)
        else:
            missing += sum(
                _uncounted_loop_flops(sub, sharding)
                for sub in kernels.sub_jaxprs(eqn.params.values())
            )
    return missing
