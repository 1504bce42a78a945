"""jaxcnn: convolutional networks in JAX/Flax, each verified against its reference."""

from .registry import ModelInfo, count_params, create_model, feature_info, list_models, model_info


def load_pretrained(source, name=None, **kwargs):
    """``(variables, pretrained_cfg)`` from a hub id such as ``'timm/resnet50.a1_in1k'`` or a
    local weights file; see :func:`jaxcnn.hub.load_pretrained`."""
    from .hub import load_pretrained as _load

    return _load(source, name, **kwargs)


def save_pretrained(directory, name, variables, pretrained_cfg=None, **kwargs):
    """Write ``variables`` as ``model.safetensors`` + ``config.json`` in timm's hub layout;
    see :func:`jaxcnn.hub.save_pretrained`."""
    from .hub import save_pretrained as _save

    return _save(directory, name, variables, pretrained_cfg, **kwargs)


def segmentation_model(backbone, num_classes, **backbone_kwargs):
    """A U-Net over any registered ``backbone``'s feature pyramid, with ``num_classes``
    per-pixel outputs; see :mod:`jaxcnn.models.segmentation`."""
    from .models.segmentation import segmentation_model as _seg

    return _seg(backbone, num_classes, **backbone_kwargs)


def forward_features(model, variables, x, train: bool = False, **kwargs):
    """The unpooled feature map (N, H', W', C) of any registered model."""
    return model.apply(variables, x, train=train, features_only=True, **kwargs)


# The documented submodules, imported on first use (``jaxcnn.convert.from_torch(...)`` after a
# bare ``import jaxcnn``): the package stays quick to import, and none of them imports
# TensorFlow or PyTorch until a function that needs one runs.
SUBMODULES = (
    'bench',
    'checkpoint',
    'config',
    'convert',
    'data',
    'hub',
    'kernels',
    'layers',
    'lr_find',
    'metrics',
    'models',
    'optim',
    'predict',
    'search',
    'sharding',
    'signal_prop',
    'summary',
    'train',
    'transfer',
)


def __getattr__(name):
    if name in SUBMODULES:
        import importlib

        return importlib.import_module(f'{__name__}.{name}')
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted([*globals(), *SUBMODULES])


__all__ = [
    'create_model',
    'list_models',
    'model_info',
    'count_params',
    'forward_features',
    'feature_info',
    'segmentation_model',
    'load_pretrained',
    'save_pretrained',
    'ModelInfo',
]
__version__ = '0.1.0'
