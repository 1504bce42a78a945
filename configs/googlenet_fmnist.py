"""GoogLeNet (torchvision layout, both auxiliary classifiers) on Fashion-MNIST at 96x96.

At 96 px the stem and pools leave 12x12 maps for inception (3a, 3b), 6x6 for (4a)-(4e), where
the auxiliary heads tap, and 3x3 for (5a, 5b). In training the loss adds each auxiliary head's
cross-entropy with weight 0.3 (Szegedy et al. 2015, §5); evaluation uses the main head only.
Argument: smoke | runlocal (every width halved).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'googlenet_fmnist',
        arg,
        'googlenet',
        image_size=96,
        num_epochs=10.0,
        optim=dict(lr=0.1, weight_decay=5e-4),
        smoke_model_kwargs=dict(width=0.5, drop_rate=0.0, aux_drop_rate=0.0),
    )
