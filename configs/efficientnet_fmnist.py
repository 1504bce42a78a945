"""EfficientNet-B0 (Tan & Le 2019) on Fashion-MNIST.

Images are resized to 32x32 (B0's stride 32 leaves a 1x1 map before the head, as 224 px
leaves 7x7). Stochastic depth 0.2 as in the paper. Argument: smoke | runlocal (width 0.25,
half the blocks per stage: the compound-scaling function shrinking B0).
"""
from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
  return zoo_fmnist_config(
      'efficientnet_fmnist', arg, 'efficientnet_b0', image_size=32, num_epochs=10.0,
      optim=dict(lr=0.05, weight_decay=1e-5), model_kwargs=dict(drop_path_rate=0.2),
      smoke_model_kwargs=dict(width_mult=0.25, depth_mult=0.5, drop_rate=0.0, drop_path_rate=0.0),
      smoke_lr=0.1)
