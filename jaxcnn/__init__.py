"""jaxcnn: convolutional networks in JAX/Flax, each verified against its reference."""
from .registry import ModelInfo, count_params, create_model, list_models, model_info


def forward_features(model, variables, x, train: bool = False, **kwargs):
    """The unpooled feature map (N, H', W', C) of any registered model."""
    return model.apply(variables, x, train=train, features_only=True, **kwargs)


__all__ = ['create_model', 'list_models', 'model_info', 'count_params', 'forward_features',
           'ModelInfo']
__version__ = '0.1.0'
