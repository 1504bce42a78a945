"""Weight conversion from PyTorch (timm / torchvision state dicts) into jaxcnn variables.

    variables = jaxcnn.convert.from_torch('resnet50', 'resnet50.pth')
    logits = jaxcnn.create_model('resnet50').apply(variables, images_nhwc)

What changes between the two worlds, and nothing else:
  * layout: conv weights OIHW -> HWIO, linear weights (out, in) -> (in, out), a convolution
    over the whole map (timm's ResNetV2 1x1 head, timm's VGG pre_logits) -> dense kernel on the
    (C, H, W) flatten, timm's CondConv expert weights
    (E, O * I * kh * kw) -> (E, kh, kw, I, O);
  * BatchNorm: weight/bias -> params scale/bias, running_mean/var -> batch_stats mean/var
    (both use var + eps with eps = 1e-5, so no epsilon correction is needed);
  * names: each family gives a short table of renames from the reference's module names, the
    timm and torchvision spellings side by side where they differ; ``module.`` and
    ``_orig_mod.`` (DataParallel, torch.compile) prefixes are dropped;
  * optional parts: a file without a model's auxiliary heads (torchvision's GoogLeNet or
    Inception-v3 built with ``aux_logits=False``, timm's ``inception_v3``) converts to the
    model built with ``aux_logits=False``;
  * scanned stages: where a model runs a stage's identical blocks through ``nn.scan`` (variables
    stacked on a leading axis under ``<stage>/stacked``), the renamed per-block weights
    (``<stage>/<b>/...``) are stacked into it by the stage helper's rule
    (:func:`jaxcnn.layers.stage.stacked_target`).
Torch is imported only to read ``.pth`` files; ``.safetensors`` files and dicts of arrays need
neither torch nor tensorflow.
"""

import os
import re
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .layers.dynamic import condconv_kernel_from_timm
from .layers.stage import stacked_target
from .registry import create_model, model_info

# family -> list of (regex, replacement) applied in order to the torch key (with '.' separators)
RENAMES: Dict[str, list] = {
    'resnet': [
        (r'\.downsample\.0\.', '.downsample.conv.'),
        (r'\.downsample\.1\.', '.downsample.bn.'),
        (r'^fc\.', 'head.fc.'),
    ],
    'resnetv2': [
        (r'^stem\.conv\.', 'conv1.'),
        (r'^stages\.(\d+)\.blocks\.(\d+)\.', lambda m: f'layer{int(m[1]) + 1}.{m[2]}.'),
        (r'\.norm(\d)\.', r'.bn\1.'),
        (r'^norm\.', 'final_bn.'),
    ],
}
# which rename table a model uses (defaults to its ModelInfo.family)
_TABLE_FOR = {'resnetv2_50': 'resnetv2', 'resnetv2_101': 'resnetv2'}

_SKIP = re.compile(r'(num_batches_tracked)$')


def register_renames(family: str, table: list):
    """Let a model family add its rename table (used by families outside this file)."""
    RENAMES[family] = table


def load_state_dict(source) -> Dict[str, np.ndarray]:
    """A state dict as numpy arrays from a dict of tensors/arrays, a .pth/.pt or a .safetensors file."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f'no weights file at {path!r}')
        if path.endswith('.safetensors'):
            try:
                from safetensors.numpy import load_file
            except ImportError:
                raise ImportError("reading .safetensors needs 'pip install safetensors'") from None
            try:
                return dict(load_file(path))
            except Exception as e:  # corrupt file
                raise ValueError(
                    f'cannot read {path!r} as safetensors ({e}); is the file complete?'
                ) from None
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"reading {path!r} needs torch: pip install 'jaxcnn[torch]' "
                "(or convert it to .safetensors)"
            ) from None
        try:
            obj = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:
            raise ValueError(
                f'cannot read {path!r} as a PyTorch checkpoint ({e}); is the file complete?'
            ) from None
        for key in ('state_dict', 'model', 'model_state_dict'):
            if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
        source = obj
    if not isinstance(source, Mapping):
        raise TypeError(
            f'expected a state dict, a .pth or a .safetensors path, got {type(source).__name__}'
        )
    out = {}
    for k, v in source.items():
        if hasattr(v, 'detach'):  # torch tensor
            v = (
                v.detach().cpu().float().numpy()
                if v.is_floating_point()
                else v.detach().cpu().numpy()
            )
        out[_strip_wrappers(k)] = np.asarray(v)
    return out


def _strip_wrappers(key: str) -> str:
    """The module's own key, without what a wrapper put in front: ``module.`` from
    DataParallel / DistributedDataParallel, ``_orig_mod.`` from ``torch.compile``."""
    while True:
        for prefix in ('module.', '_orig_mod.'):
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return key


def _target(key: str, table) -> Tuple[str, Tuple[str, ...]]:
    """(collection, flax path) for a torch key after renames."""
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    *mods, leaf = key.split('.')
    if leaf == 'running_mean':
        return 'batch_stats', (*mods, 'mean')
    if leaf == 'running_var':
        return 'batch_stats', (*mods, 'var')
    return 'params', (*mods, leaf)


def _convert_leaf(leaf: str, value: np.ndarray, target_shape) -> np.ndarray:
    if leaf == 'weight' and value.ndim == 2 and len(target_shape) == 5:
        # timm CondConv2d experts: (E, O * I * kh * kw), OIHW flattened -> (E, kh, kw, I, O)
        e, kh, kw, i, o = target_shape
        if value.shape == (e, o * i * kh * kw):
            return condconv_kernel_from_timm(value, o, i, (kh, kw))
    if (
        leaf == 'weight'
        and value.ndim == 4
        and len(target_shape) == 2
        and (value[0].size, value.shape[0]) == tuple(target_shape)
    ):
        # a convolution over the whole map read as a dense layer on PyTorch's (C, H, W)
        # flatten: timm's VGG pre_logits (fc1 7x7, fc2 1x1), timm's ResNetV2 1x1 classifier
        return value.reshape(value.shape[0], -1).T
    if leaf == 'weight':
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif value.ndim == 2:
            value = value.T  # (out, in) -> (in, out)
    if value.shape != tuple(target_shape) and [d for d in value.shape if d != 1] == [
        d for d in target_shape if d != 1
    ]:
        # only singleton axes differ: a 1x1-conv classifier -> dense kernel, or a per-channel
        # (O, 1, 1, 1) gain (timm's ScaledStdConv2d) -> (O,)
        value = value.reshape(target_shape)
    return value


def _flax_leaf_name(leaf: str, ndim: int) -> str:
    if leaf == 'weight':
        return 'kernel' if ndim >= 2 else 'scale'
    return leaf


def from_torch(
    name: str,
    state_dict,
    num_classes: Optional[int] = None,
    *,
    renames: Optional[list] = None,
    dtype=jnp.float32,
) -> dict:
    """Convert a timm/torchvision state dict for model ``name`` into jaxcnn variables.

    ``num_classes`` is read from the classifier weights when not given. Every parameter and
    statistic of the jaxcnn model must be filled exactly once; anything missing, left over or
    of the wrong shape is reported by name.
    """
    table, converted, num_classes = _entries(
        name, load_state_dict(state_dict), renames, num_classes
    )
    fit = _fit(name, converted, num_classes)
    if fit['missing'] or fit['unexpected'] or fit['mismatched']:
        raise ValueError(
            _misfit_message(name, fit, _looks_like(name, table, converted, num_classes))
        )
    return traverse_util.unflatten_dict(
        {k: jnp.asarray(v, dtype) for k, v in _assemble(fit).items()}
    )


def _assemble(fit) -> Dict[tuple, np.ndarray]:
    """The fitted file's arrays in the model's layout, {(collection, *path): array}: each leaf
    converted, the blocks of a scanned stage stacked in block order."""
    out = {}
    for k, target_shape in fit['flat'].items():
        if k in fit['stacked']:
            out[k] = np.stack(
                [
                    _convert_leaf(tk.rsplit('.', 1)[-1], v, target_shape[1:])
                    for _, (_, (tk, v)) in sorted(fit['stacked'][k].items())
                ]
            )
        else:
            tk, v = fit['converted'][k]
            out[k] = _convert_leaf(tk.rsplit('.', 1)[-1], v, target_shape)
    return out


def _entries(name, sd, renames=None, num_classes=None):
    """(rename table, {(collection, *flax path): (torch key, value)}, num_classes) of a state
    dict for model ``name``; num_classes read from the classifier when not given."""
    info = model_info(name)
    table = renames if renames is not None else RENAMES.get(_TABLE_FOR.get(name, info.family))
    if table is None:
        raise ValueError(
            f'no PyTorch conversion for {name!r} (family {info.family!r}); '
            f'supported families: {", ".join(sorted(RENAMES))}'
        )
    converted = {}
    for key, value in sd.items():
        if _SKIP.search(key):
            continue
        col, path = _target(key, table)
        path = (*path[:-1], _flax_leaf_name(path[-1], value.ndim))
        converted[(col, *path)] = (key, value)
    head_key = ('params', 'head', 'fc', 'kernel')
    if num_classes is None:
        num_classes = converted[head_key][1].shape[0] if head_key in converted else 0
    return table, converted, num_classes


def misfit(name: str, state_dict, num_classes: Optional[int] = None) -> str:
    """'' where ``state_dict`` converts to model ``name``, else the one-line reason. Only the
    names and shapes are read, so arrays standing in for the weights will do."""
    sd = {_strip_wrappers(k): v for k, v in state_dict.items()}
    _, converted, num_classes = _entries(name, sd, None, num_classes)
    fit = _fit(name, converted, num_classes)
    if fit['missing'] or fit['unexpected'] or fit['mismatched']:
        return _misfit_message(name, fit, None)
    return ''


def _fit(name, converted, num_classes, flat=None) -> dict:
    """How the converted entries {(collection, *path): (torch key, value)} fit model ``name``:
    its flat shapes (``flat``, {(collection, *path): shape}, where the variables are given),
    the entries of its stacked (scanned) leaves, and what is missing, left over or of the wrong
    shape."""
    converted = dict(converted)
    if flat is None:
        flat = _model_shapes(name, converted, num_classes)
    # weights of blocks the model runs through nn.scan: target key -> {index: (key, value)}
    stacked: Dict[tuple, dict] = {}
    for k in [k for k in converted if k not in flat]:
        hit = stacked_target(k, flat)
        if hit is not None:
            stacked.setdefault(hit[0], {})[hit[1]] = (k, converted.pop(k))
    missing, unexpected, mismatched = [], [], []
    for k, shape in flat.items():
        if k in stacked:
            missing += [f"{'/'.join(k)}[{i}]" for i in range(shape[0]) if i not in stacked[k]]
            unexpected += [
                f"{tk} -> {'/'.join(uk)}"
                for i, (uk, (tk, _)) in stacked[k].items()
                if not 0 <= i < shape[0]
            ]
            mismatched += [
                _mismatch(tk, v, f"{'/'.join(k)}[{i}]", shape[1:])
                for i, (uk, (tk, v)) in stacked[k].items()
                if 0 <= i < shape[0]
            ]
        elif k not in converted:
            missing.append(f"{'/'.join(k)} {tuple(shape)}")
        else:
            mismatched.append(_mismatch(*converted[k], '/'.join(k), shape))
    unexpected += [f"{converted[k][0]} -> {'/'.join(k)}" for k in converted if k not in flat]
    return dict(
        flat=flat,
        stacked=stacked,
        converted=converted,
        missing=sorted(missing),
        unexpected=sorted(unexpected),
        mismatched=[m for m in mismatched if m],
    )


def _model_shapes(name, converted, num_classes) -> dict:
    """{(collection, *path): shape} of model ``name`` built for the converted file: its head
    size, its auxiliary heads where the file has them, its input channels."""
    info = model_info(name)
    model = create_model(name, num_classes=num_classes)
    aux_heads = {head for _, head in getattr(model, 'aux_taps', ())}
    if getattr(model, 'aux_logits', False) and not any(k[1] in aux_heads for k in converted):
        model = create_model(name, num_classes=num_classes, aux_logits=False)
    h, w, c = info.input_size

    def shapes_for(in_ch):
        x = jnp.zeros((1, max(h, info.min_input), max(w, info.min_input), in_ch), jnp.float32)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
        return traverse_util.flatten_dict(
            jax.tree.map(lambda s: s.shape, shapes, is_leaf=lambda s: hasattr(s, 'shape'))
        )

    flat = shapes_for(c)
    # the input channels the file was trained with (a grayscale model, say): a kernel that
    # reads the c input channels here and reads another number in the file, with the same
    # outputs, is the stem's
    other_in = {
        converted[k][1].shape[1]
        for k, shape in flat.items()
        if len(shape) == 4
        and shape[2] == c
        and k in converted
        and converted[k][1].ndim == 4
        and converted[k][1].shape[0] == shape[3]
        and converted[k][1].shape[1] != c
    }
    if len(other_in) == 1:
        flat = shapes_for(other_in.pop())
    return flat


def _mismatch(torch_key, value, target, target_shape) -> str:
    """'' where ``value`` converts to ``target_shape``, else what does not fit."""
    try:
        got = _convert_leaf(torch_key.rsplit('.', 1)[-1], value, target_shape).shape
    except Exception:  # noqa: BLE001 (a reshape that cannot be done)
        got = None
    if got == tuple(target_shape):
        return ''
    return f'{torch_key} {tuple(value.shape)} for {target} {tuple(target_shape)}'


def _looks_like(name, table, converted, num_classes) -> Optional[str]:
    """The registered model, other than ``name``, with the same conversion table, that the
    state dict fits exactly (None when none does). Only models whose reference parameter
    count is within a factor of 2 of the file's are built, nearest first: building each takes
    seconds."""
    from .registry import list_models

    in_file = sum(v.size for k, (_, v) in converted.items() if k[0] == 'params')
    candidates = []
    for other in list_models():
        info = model_info(other)
        if (
            other == name
            or not info.reference_params
            or not in_file
            or RENAMES.get(_TABLE_FOR.get(other, info.family)) is not table
        ):
            continue
        ratio = info.reference_params / in_file
        if 0.5 <= ratio <= 2:
            candidates.append((abs(np.log(ratio)), other))
    for _, other in sorted(candidates):
        try:
            fit = _fit(other, converted, num_classes)
        except Exception:  # noqa: BLE001 (a model the file cannot even build)
            continue
        if not (fit['missing'] or fit['unexpected'] or fit['mismatched']):
            return other
    return None


def _misfit_message(name, fit, other, subject=None) -> str:
    def listed(what, items):
        return f'{len(items)} {what} ({"; ".join(items[:4])}{"; ..." if len(items) > 4 else ""})'

    parts = [
        listed(what, fit[key])
        for what, key in (
            ('missing', 'missing'),
            ('unexpected', 'unexpected'),
            ('of another shape', 'mismatched'),
        )
        if fit[key]
    ]
    hint = (
        f"; it looks like {other}'s weights: convert it with from_torch({other!r}, ...)"
        if other
        else ''
    )
    subject = subject or f'state dict does not fit {name}'
    return f'{subject}: ' + ', '.join(parts) + hint


def torch_layout(name: str, variables=None, layout: Optional[str] = None) -> Dict[str, tuple]:
    """{key: shape} of the state dict of model ``name``'s twin, built on PyTorch's meta device
    (no memory, no initialisation): ``layout`` 'timm' or 'torchvision' (default: the twin's own
    library), with the head size and auxiliary heads of ``variables`` where given."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            "exporting to PyTorch's layout needs torch: pip install 'jaxcnn[torch]', "
            'or pass template= (a state dict or weights file in the layout wanted)'
        ) from None
    lib, arch = (
        model_info(name).torch_name.split(':', 1) if model_info(name).torch_name else ('', '')
    )
    if not arch:
        raise ValueError(f'{name} has no timm or torchvision twin to export to')
    layout = layout or {'tv': 'torchvision', 'timm': 'timm'}[lib]
    kwargs = {}
    if variables is not None:
        head = variables['params'].get('head', {}).get('fc', {}).get('kernel')
        kwargs['num_classes'] = 0 if head is None else int(np.shape(head)[-1])
        if layout == 'torchvision' and _aux_heads(name) and not _has_aux(name, variables):
            kwargs['aux_logits'] = False
    with torch.device('meta'):
        if layout == 'timm':
            import timm

            if not timm.is_model(arch):
                raise ValueError(
                    f"timm has no {arch}, so {name} exports only in torchvision's layout: "
                    "layout='torchvision'"
                )
            ref = timm.create_model(arch, pretrained=False, **kwargs)
        elif layout == 'torchvision':
            import torchvision

            if lib != 'tv' or not hasattr(torchvision.models, arch):
                raise ValueError(f"torchvision has no {arch}; export {name} with layout='timm'")
            if arch in ('googlenet', 'inception_v3'):
                kwargs['init_weights'] = False  # scipy's truncated normal cannot run on meta
            ref = getattr(torchvision.models, arch)(weights=None, **kwargs)
        else:
            raise ValueError(f"layout must be 'timm' or 'torchvision', got {layout!r}")
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def _aux_heads(name) -> set:
    return {head for _, head in getattr(create_model(name), 'aux_taps', ())}


def _has_aux(name, variables) -> bool:
    return bool(_aux_heads(name) & set(variables['params']))


def to_torch(
    name: str,
    variables,
    *,
    layout: Optional[str] = None,
    template=None,
    tensors: bool = True,
) -> dict:
    """jaxcnn ``variables`` of model ``name`` as the state dict of its timm or torchvision twin,
    which ``load_state_dict(strict=True)`` accepts: the exact inverse of :func:`from_torch`,
    so ``from_torch(name, to_torch(name, v))`` gives ``v`` back bit for bit.

    The names and shapes come from ``template`` (a state dict or weights file in the layout
    wanted, e.g. the one the weights were loaded from) or else from the twin built on PyTorch's
    meta device in ``layout`` ('timm' or 'torchvision'; default the twin's library). Auxiliary
    heads that the layout has no place for (timm's inception_v3) are left out. ``tensors=False``
    gives NumPy arrays, for writing safetensors without torch.
    """
    from flax.core import unfreeze

    variables = unfreeze(variables)
    if template is None:
        shapes = torch_layout(name, variables, layout)
    else:
        shapes = {k: tuple(np.shape(v)) for k, v in load_state_dict(template).items()}
    # Where each template entry's numbers land: convert an index array in place of the weights,
    # with the very code from_torch runs, and invert the permutation it gives.
    index, offset = {}, 0
    int_type = np.int32 if sum(int(np.prod(s)) for s in shapes.values()) < 2**31 else np.int64
    for key, shape in shapes.items():
        if not _SKIP.search(key):
            size = int(np.prod(shape))
            index[key] = np.arange(offset, offset + size, dtype=int_type).reshape(shape)
            offset += size
    _, converted, _ = _entries(name, index)
    values = traverse_util.flatten_dict(variables)
    targets = {c for c, *_ in converted}
    if _aux_heads(name) and not any(k[1] in _aux_heads(name) for k in converted):
        values = {k: v for k, v in values.items() if k[1] not in _aux_heads(name)}
    values = {k: v for k, v in values.items() if k[0] in targets}
    fit = _fit(name, converted, None, flat={k: tuple(np.shape(v)) for k, v in values.items()})
    if fit['missing'] or fit['unexpected'] or fit['mismatched']:
        raise ValueError(
            _misfit_message(
                name,
                fit,
                None,
                subject=f"the variables of {name} do not fit the layout's state dict",
            )
        )
    dtype = np.result_type(np.float32, *(np.asarray(v).dtype for v in values.values()))
    flat_out = np.zeros(offset, dtype)
    written = np.zeros(offset, bool)
    placed = _assemble(fit)
    for k, where in placed.items():
        where = where.ravel()
        flat_out[where] = np.asarray(values[k], dtype).ravel()
        written[where] = True
    # every number of the state dict written, and as many written as there are: the
    # rearrangement is one-to-one, so this is from_torch's exact inverse
    if not written.all() or sum(w.size for w in placed.values()) != offset:
        raise AssertionError(f'the conversion of {name} is not a one-to-one rearrangement')
    out = {}
    for key, shape in shapes.items():
        if key in index:
            start = int(index[key].flat[0]) if index[key].size else 0
            out[key] = flat_out[start : start + index[key].size].reshape(shape)
        else:  # BatchNorm's num_batches_tracked: nothing in jaxcnn counts steps
            out[key] = np.zeros(shape, np.int64)
    if tensors:
        import torch

        out = {k: torch.from_numpy(np.array(v, order='C')) for k, v in out.items()}
    return out


def to_safetensors(state_dict, path: str):
    """Save a state dict (e.g. from torch) as .safetensors, readable here without torch."""
    from safetensors.numpy import save_file

    save_file({k: np.array(v, order='C') for k, v in load_state_dict(state_dict).items()}, path)
