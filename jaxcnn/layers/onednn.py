"""Dense convolutions on the CPU through oneDNN, the library PyTorch's CPU convolutions run on.

XLA:CPU runs convolutions with Eigen's kernels, built for a baseline instruction set; oneDNN
picks its kernels for the CPU it runs on (AVX-512 where there is one). On the 2-core test machine
ResNet-18's convolutions and their gradients take 382 ms per training step through oneDNN
against 505 ms in Eigen's (``python -m jaxcnn.experiments.conv_kernels_cpu``), and the whole
step runs 1.13x faster (``python -m jaxcnn.experiments.onednn_conv_cpu``; BENCHMARKS.md).

``onednn_conv.cc`` holds three XLA FFI handlers (the convolution, its input gradient and its
kernel gradient). It is compiled once per machine, against the installed jaxlib's FFI headers and
the ``onednn-devel-cpu-gomp`` wheel, into ``$JAXCNN_CACHE_DIR`` (default
``~/.cache/jaxcnn``), and loaded from there afterwards. Where it cannot be built (no C++ compiler,
no oneDNN wheel, a platform other than x86-64 Linux), or with ``JAXCNN_ONEDNN=0`` in the
environment, :func:`available` is False and ``layers.conv_general_dilated`` keeps XLA's
convolutions; :func:`unavailable_reason` says why.

:func:`conv` is the convolution as a custom VJP. Its gradients are custom VJPs of the same three
handlers (the three are the bilinear maps of one another's transposes), so reverse mode nests to
any order; forward mode is not supported.
"""
import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name('onednn_conv.cc')
_FORWARD, _INPUT_GRADIENT, _KERNEL_GRADIENT = (
    'JaxcnnConvForward', 'JaxcnnConvInputGradient', 'JaxcnnConvKernelGradient')
_RUNTIME, _HEADERS = 'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get('JAXCNN_CACHE_DIR')
                        or pathlib.Path.home() / '.cache' / 'jaxcnn')


def _installed_file(distribution: str, suffix: str) -> pathlib.Path:
    """The file of an installed wheel whose path ends with ``suffix``."""
    for f in importlib.metadata.files(distribution) or ():
        path = pathlib.Path(f.locate()).resolve()
        if path.as_posix().endswith(suffix):
            return path
    raise FileNotFoundError(f'{distribution} has no {suffix}')


def _build(rebuild: bool = False) -> pathlib.Path:
    """The compiled handlers, built into the cache on first use, or again with ``rebuild``
    (raises with the reason)."""
    if sys.platform != 'linux' or platform.machine() != 'x86_64':
        raise RuntimeError(f'the oneDNN wheels are for x86-64 Linux, not {sys.platform} {platform.machine()}')
    compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
    if not compiler:
        raise RuntimeError('no C++ compiler (c++ or g++, or $CXX) on PATH')
    try:
        header = _installed_file(_HEADERS, 'include/oneapi/dnnl/dnnl.hpp')
        library = _installed_file(_RUNTIME, 'lib/libdnnl.so')
        onednn_version = importlib.metadata.version(_RUNTIME)
    except (importlib.metadata.PackageNotFoundError, FileNotFoundError) as e:
        raise RuntimeError(f'oneDNN is not installed ({e}); pip install {_RUNTIME} {_HEADERS}') from e
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b'\0'.join([source, jax.__version__.encode(), onednn_version.encode(),
                                     compiler.encode()])).hexdigest()[:16]
    target = _cache_dir() / f'jaxcnn_onednn_conv_{key}.so'
    if target.exists() and not rebuild:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        command = [compiler, '-O3', '-std=c++17', '-shared', '-fPIC', '-w',
                   f'-I{jax.ffi.include_dir()}', f'-I{header.parents[2]}', str(_SOURCE),
                   f'-L{library.parent}', '-l:libdnnl.so', f'-Wl,-rpath,{library.parent}',
                   '-o', str(built)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f'building {_SOURCE.name} failed: {done.stderr.strip()[-500:]}')
        os.replace(built, target)        # atomic: concurrent first uses each build, one wins
    return target


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[bool, Optional[str]]:
    if os.environ.get('JAXCNN_ONEDNN', '1') == '0':
        return False, 'turned off by JAXCNN_ONEDNN=0'
    try:
        try:
            library = ctypes.CDLL(str(_build()))
        except OSError:       # a damaged file in the cache (a truncated copy): build it anew
            library = ctypes.CDLL(str(_build(rebuild=True)))
        for name in (_FORWARD, _INPUT_GRADIENT, _KERNEL_GRADIENT):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                        platform='cpu')
    except (RuntimeError, OSError, AttributeError) as e:
        return False, str(e)
    return True, None


def available() -> bool:
    """Whether the oneDNN convolutions are built and registered with XLA:CPU (building them on
    the first call)."""
    return _load()[0]


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    return _load()[1]


def version() -> Optional[str]:
    """The installed oneDNN wheel's version (None without it)."""
    try:
        return importlib.metadata.version(_RUNTIME)
    except importlib.metadata.PackageNotFoundError:
        return None


def log_line() -> str:
    """What a CPU run's dense convolutions run on, and why, in one line for its log."""
    if not available():
        return f"dense convolutions: XLA's kernels (oneDNN unavailable: {unavailable_reason()})"
    if jax.device_count() > 1:
        return (f"dense convolutions: XLA's kernels (oneDNN's run on one device; this run has "
                f'{jax.device_count()})')
    return "dense convolutions: oneDNN's kernels"


def _call(target, out_shape, a, b, strides, dilation, pads):
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            vmap_method='sequential')(
        a, b, strides=np.asarray(strides, np.int64), dilation=np.asarray(dilation, np.int64),
        pads=np.asarray(pads, np.int64).reshape(4))


def output_shape(x_shape, k_shape, strides, dilation, pads):
    (n, h, w, _), (kh, kw, _, c_out) = x_shape, k_shape
    return (n, *((size + lo + hi - (kk - 1) * d - 1) // s + 1 for size, kk, s, d, (lo, hi)
                 in zip((h, w), (kh, kw), strides, dilation, pads)), c_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x, k, strides, dilation, pads):
    """A dense NHWC x HWIO float32 convolution: ``strides`` and ``dilation`` (the kernel's) are
    pairs, ``pads`` ((top, bottom), (left, right)), all non-negative."""
    return _call(_FORWARD, output_shape(x.shape, k.shape, strides, dilation, pads), x, k,
                 strides, dilation, pads)


def _conv_fwd(x, k, strides, dilation, pads):
    return conv(x, k, strides, dilation, pads), (x, k)


def _conv_bwd(strides, dilation, pads, res, dy):
    x, k = res
    return (input_gradient(dy, k, x.shape, strides, dilation, pads),
            kernel_gradient(x, dy, k.shape, strides, dilation, pads))


conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def input_gradient(dy, k, x_shape, strides, dilation, pads):
    """The gradient of :func:`conv` with respect to its input of shape ``x_shape``."""
    return _call(_INPUT_GRADIENT, x_shape, dy, k, strides, dilation, pads)


def _input_gradient_fwd(dy, k, x_shape, strides, dilation, pads):
    return input_gradient(dy, k, x_shape, strides, dilation, pads), (dy, k)


def _input_gradient_bwd(x_shape, strides, dilation, pads, res, g):
    dy, k = res      # <g, input_gradient(dy, k)> = <conv(g, k), dy> = <kernel_gradient(g, dy), k>
    return (conv(g, k, strides, dilation, pads),
            kernel_gradient(g, dy, k.shape, strides, dilation, pads))


input_gradient.defvjp(_input_gradient_fwd, _input_gradient_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def kernel_gradient(x, dy, k_shape, strides, dilation, pads):
    """The gradient of :func:`conv` with respect to its kernel of shape ``k_shape``."""
    return _call(_KERNEL_GRADIENT, k_shape, x, dy, strides, dilation, pads)


def _kernel_gradient_fwd(x, dy, k_shape, strides, dilation, pads):
    return kernel_gradient(x, dy, k_shape, strides, dilation, pads), (x, dy)


def _kernel_gradient_bwd(k_shape, strides, dilation, pads, res, g):
    x, dy = res      # <g, kernel_gradient(x, dy)> = <input_gradient(dy, g), x> = <conv(x, g), dy>
    return (input_gradient(dy, g, x.shape, strides, dilation, pads),
            conv(x, g, strides, dilation, pads))


kernel_gradient.defvjp(_kernel_gradient_fwd, _kernel_gradient_bwd)
