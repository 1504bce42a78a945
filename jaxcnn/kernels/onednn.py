"""Dense convolutions on the CPU through oneDNN, the library PyTorch's CPU convolutions run on.

XLA:CPU runs convolutions with Eigen's kernels, built for a baseline instruction set; oneDNN
picks its kernels for the CPU it runs on (AVX-512 where there is one). On the 2-core test machine
ResNet-18's convolutions and their gradients take 382 ms per training step through oneDNN
against 505 ms in Eigen's (``python benchmarks/conv_kernels_cpu.py``); whole steps with and
without it: ``python benchmarks/kernel_forms.py`` (BENCHMARKS.md).

``onednn_conv.cc`` holds three XLA FFI handlers (the convolution, its input gradient and its
kernel gradient). It is compiled once per machine, against the installed jaxlib's FFI headers and
the ``onednn-devel-cpu-gomp`` wheel, into ``$JAXCNN_CACHE_DIR`` (default
``~/.cache/jaxcnn``), and loaded from there afterwards. Where it cannot be built (no C++ compiler,
no oneDNN wheel, a platform other than x86-64 Linux), or with ``JAXCNN_ONEDNN=0`` in the
environment, :func:`available` is False and the CPU policy keeps XLA's convolutions; :func:`unavailable_reason` says why.

:func:`conv` is the convolution. The three handlers are the bilinear maps of one another's
transposes, and :func:`jaxcnn.kernels.autodiff.convolution_triple` makes each differentiable in
every mode from the other two: reverse mode nests to any order, and forward mode (``jax.jvp``,
``jax.linearize``, forward-over-reverse Hessian-vector products) runs the handlers too.
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

from .autodiff import convolution_triple

_SOURCE = pathlib.Path(__file__).with_name('onednn_conv.cc')
_FORWARD, _INPUT_GRADIENT, _KERNEL_GRADIENT = (
    'JaxcnnConvForward',
    'JaxcnnConvInputGradient',
    'JaxcnnConvKernelGradient',
)
_RUNTIME, _HEADERS = 'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(
        os.environ.get('JAXCNN_CACHE_DIR') or pathlib.Path.home() / '.cache' / 'jaxcnn'
    )


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
        raise RuntimeError(
            f'the oneDNN wheels are for x86-64 Linux, not {sys.platform} {platform.machine()}'
        )
    compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
    if not compiler:
        raise RuntimeError('no C++ compiler (c++ or g++, or $CXX) on PATH')
    try:
        header = _installed_file(_HEADERS, 'include/oneapi/dnnl/dnnl.hpp')
        library = _installed_file(_RUNTIME, 'lib/libdnnl.so')
        onednn_version = importlib.metadata.version(_RUNTIME)
    except (importlib.metadata.PackageNotFoundError, FileNotFoundError) as e:
        raise RuntimeError(
            f'oneDNN is not installed ({e}); pip install {_RUNTIME} {_HEADERS}'
        ) from e
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b'\0'.join([source, jax.__version__.encode(), onednn_version.encode(), compiler.encode()])
    ).hexdigest()[:16]
    target = _cache_dir() / f'jaxcnn_onednn_conv_{key}.so'
    if target.exists() and not rebuild:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        command = [
            compiler,
            '-O3',
            '-std=c++17',
            '-shared',
            '-fPIC',
            '-w',
            f'-I{jax.ffi.include_dir()}',
            f'-I{header.parents[2]}',
            str(_SOURCE),
            f'-L{library.parent}',
            '-l:libdnnl.so',
            f'-Wl,-rpath,{library.parent}',
            '-o',
            str(built),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f'building {_SOURCE.name} failed: {done.stderr.strip()[-500:]}')
        os.replace(built, target)  # atomic: concurrent first uses each build, one wins
    return target


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[bool, Optional[str]]:
    if os.environ.get('JAXCNN_ONEDNN', '1') == '0':
        return False, 'turned off by JAXCNN_ONEDNN=0'
    try:
        try:
            library = ctypes.CDLL(str(_build()))
        except OSError:  # a damaged file in the cache (a truncated copy): build it anew
            library = ctypes.CDLL(str(_build(rebuild=True)))
        for name in (_FORWARD, _INPUT_GRADIENT, _KERNEL_GRADIENT):
            jax.ffi.register_ffi_target(
                name, jax.ffi.pycapsule(getattr(library, name)), platform='cpu'
            )
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
        return (
            f"dense convolutions: XLA's kernels (oneDNN's run on one device; this run has "
            f'{jax.device_count()})'
        )
    return "dense convolutions: oneDNN's kernels"


def output_shape(x_shape, k_shape, strides, dilation, pads):
    (n, h, w, _), (kh, kw, _, c_out) = x_shape, k_shape
    return (
        n,
        *(
            (size + lo + hi - (kk - 1) * d - 1) // s + 1
            for size, kk, s, d, (lo, hi) in zip((h, w), (kh, kw), strides, dilation, pads)
        ),
        c_out,
    )


def _handler(target, out_shape, strides, dilation, pads):
    call = jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method='sequential'
    )
    attrs = dict(
        strides=np.asarray(strides, np.int64),
        dilation=np.asarray(dilation, np.int64),
        pads=np.asarray(pads, np.int64).reshape(4),
    )
    return lambda a, b: call(a, b, **attrs)


@functools.lru_cache(maxsize=1024)
def _triple(x_shape, k_shape, strides, dilation, pads):
    """The convolution, its input gradient and its kernel gradient for one geometry, as the
    three handlers, each differentiable in every mode (:func:`autodiff.convolution_triple`)."""
    y_shape = output_shape(x_shape, k_shape, strides, dilation, pads)
    geometry = (strides, dilation, pads)
    return convolution_triple(
        _handler(_FORWARD, y_shape, *geometry),
        _handler(_INPUT_GRADIENT, x_shape, *geometry),
        _handler(_KERNEL_GRADIENT, k_shape, *geometry),
        'onednn.conv',
    )


def conv(x, k, strides, dilation, pads):
    """A dense NHWC x HWIO float32 convolution: ``strides`` and ``dilation`` (the kernel's) are
    pairs, ``pads`` ((top, bottom), (left, right)), all non-negative."""
    pads = tuple(tuple(int(v) for v in p) for p in pads)
    return _triple(tuple(x.shape), tuple(k.shape), tuple(strides), tuple(dilation), pads)[0](x, k)
