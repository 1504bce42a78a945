"""Data parallelism with `jax.jit` and named shardings (no pmap).

One 1-D mesh over every device, axis 'data'. The batch is split along 'data'; parameters,
BatchNorm statistics and optimiser state are replicated. Because the jitted step is written
for the *global* batch, every reduction in it — the loss mean, the gradient, and BatchNorm's
batch mean/variance — is over the global batch: XLA inserts the cross-device all-reduces.
That is "synchronised BatchNorm" for free (tests/test_sharding.py checks it).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def maybe_initialize_distributed(config) -> None:
    """Calls jax.distributed.initialize() when config.distributed is set.

    The coordinator address, process count and process id come from the config when given
    (`coordinator_address`, `num_processes`, `process_id`), else from the environment
    (JAXCNN_COORDINATOR, JAXCNN_NUM_PROCESSES, JAXCNN_PROCESS_ID), else JAX detects them
    (SLURM, TPU pods, ...). Must run before anything touches a device.
    """
    if not config.get('distributed', False):
        return
    kwargs = {}
    for key, env, cast in (
        ('coordinator_address', 'JAXCNN_COORDINATOR', str),
        ('num_processes', 'JAXCNN_NUM_PROCESSES', int),
        ('process_id', 'JAXCNN_PROCESS_ID', int),
    ):
        value = config.get(key, None)
        if value in (None, '', -1):
            value = os.environ.get(env)
        if value not in (None, '', -1):
            kwargs[key] = cast(value)
    # CPU collectives across processes need gloo (the default has none); the option only
    # concerns the CPU backend, so setting it is harmless on accelerators.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**kwargs)


def split_host_cpu(config) -> int:
    """Expose the host's cores as separate XLA CPU devices, before JAX starts its backends.

    XLA:CPU runs a small-channel training step on little more than one core; as N devices the
    same data-parallel step runs N shards at once (measured: ResNet-20 on Fashion-MNIST goes
    from ~270 to ~360 images/s on 2 cores). Only the CPU backend is affected, so a GPU or TPU
    run is unchanged. `config.cpu_devices`: 0 leaves XLA alone, -1 picks the largest core
    count that divides the batch, N asks for N. Returns the count set (0 when untouched).
    """
    want = int(config.get('cpu_devices', 0) or 0)
    flags = os.environ.get('XLA_FLAGS', '')
    if (
        want == 0
        or 'xla_force_host_platform_device_count' in flags
        or jax_backends_started()
        or accelerator_plugin_installed()
    ):
        return 0
    if want < 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        want = max(d for d in range(1, max(1, cores) + 1) if config.batch_size % d == 0)
    if want > 1:
        # The devices share the cores with everything else on the host: a starved thread may
        # reach an all-reduce late, so wait for it (XLA aborts after 40 s by default).
        os.environ['XLA_FLAGS'] = (
            f'{flags} --xla_force_host_platform_device_count={want} '
            '--xla_cpu_collective_call_terminate_timeout_seconds=600'
        ).strip()
        # One program at a time: with asynchronous CPU dispatch two multi-device programs can be
        # in flight together, and their all-reduces can then wait on each other's threads. The
        # host loop loses nothing by it: each step is one compiled program that takes far longer
        # than dispatching the next.
        jax.config.update('jax_cpu_enable_async_dispatch', False)
    return want


def accelerator_plugin_installed() -> bool:
    """True when a GPU/TPU build of JAX is installed (then the host CPU is left alone)."""
    from importlib import metadata

    names = {
        (d.metadata.get('Name') or '').lower().replace('_', '-') for d in metadata.distributions()
    }
    return any(n.startswith(('jax-cuda', 'jax-rocm', 'libtpu')) for n in names)


def jax_backends_started() -> bool:
    """True once any JAX backend exists (after which XLA_FLAGS are no longer read)."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge._backends)
    except Exception:  # private API moved: assume started, never mis-set flags
        return True


def make_mesh(num_devices: int = -1) -> jax.sharding.Mesh:
    """A 1-D ('data',) mesh over all devices, or over the first `num_devices` of them."""
    devices = jax.devices()
    if num_devices and num_devices > 0:
        if num_devices > len(devices):
            raise ValueError(
                f'num_devices={num_devices} but only {len(devices)} devices exist; '
                f'use num_devices=-1 for all of them.'
            )
        devices = devices[:num_devices]
    # Auto axes: XLA's partitioner places the collectives (the step is written for the global
    # batch). Newer JAX defaults to Explicit axes, which would make every gather spell out its
    # output sharding.
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
    )


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh, what: str = 'batch_size') -> None:
    """Fails before compiling when the global batch cannot be split evenly."""
    n_dev = mesh.devices.size
    n_proc = jax.process_count()
    if global_batch < 1:
        raise ValueError(
            f'{what}={global_batch}: a batch needs at least one example per device; '
            f'use a multiple of {n_dev}.'
        )
    if global_batch % n_dev:
        lo = global_batch - global_batch % n_dev
        raise ValueError(
            f'{what}={global_batch} is not divisible by the {n_dev} devices; '
            f'use a multiple of {n_dev} (e.g. {lo or n_dev} or {lo + n_dev}).'
        )
    if global_batch % n_proc:
        raise ValueError(
            f'{what}={global_batch} is not divisible by the {n_proc} processes; '
            f'use a multiple of {n_proc}.'
        )


def process_slice(global_batch: int) -> slice:
    """The rows of a global batch that this process feeds (contiguous, in process order)."""
    per = global_batch // jax.process_count()
    start = jax.process_index() * per
    return slice(start, start + per)


def host_to_global(tree, mesh):
    """Assembles each process's rows of a batch into global arrays sharded on 'data'.

    `tree` holds this process's local rows (the global batch is the concatenation over
    processes in process order). On one process this is just a sharded device_put.
    """
    sharding = batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, tree)


def replicate(tree, mesh):
    """Places a host pytree (identical on every process) on all devices."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    # Every process holds the full value; make_array_from_callback assembles the global array
    # without cross-host transfers.
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(
            np.shape(x), sharding, lambda idx, x=x: np.asarray(x)[idx]
        ),
        tree,
    )


def any_process(flag: bool) -> bool:
    """True when `flag` is set on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([bool(flag)]))))
