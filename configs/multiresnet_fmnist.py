"""Multi-ResNet-200 with k = 5 residual functions per block (Abdi & Nahavandi 2016) on Fashion-MNIST.

The authors' CIFAR recipe (their Torch code, after fb.resnet.torch): SGD with Nesterov momentum
0.9, lr 0.1, weight decay 1e-4, batch 64, crop and flip; here 20 epochs with the zoo's cosine
schedule. Argument: smoke | runlocal (depth 29, k = 2, half the planes: three bottleneck
units per stage, two of them scanned).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'multiresnet_fmnist',
        arg,
        'multiresnet200_k5',
        num_epochs=20.0,
        batch_size=64,
        optim=dict(lr=0.1, weight_decay=1e-4),
        smoke_model_kwargs=dict(depth=29, k=2, widths=(8, 16, 32), stem_width=8),
        smoke_lr=0.2,
    )
