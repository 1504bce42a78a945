"""Hyper WRN 40-2 (Ha, Dai & Le 2016, §4.2) on Fashion-MNIST: every 3x3 kernel of the Wide
ResNet made by one shared hypernetwork from 64-d layer embeddings (0.148M free parameters).

Paper recipe (Appendix A.3.2): Adam for the hypernetwork version (lr 0.002 stepped down to
5e-5), batch 128, pad-and-crop and flips. Here the step schedule is replaced by the zoo's
cosine; weight decay stays off (the paper's L2 acts on the generated kernels, not on the
embeddings or the generator). Argument: smoke | runlocal (WRN-10-1: one block per group).
"""

from jaxcnn.config import zoo_fmnist_config


def get_config(arg=None):
    return zoo_fmnist_config(
        'hypernet_fmnist',
        arg,
        'hyper_wrn40_2',
        num_epochs=20.0,
        optim=dict(name='adam', lr=2e-3, weight_decay=0.0),
        smoke_model_kwargs=dict(depth=10, widen_factor=1),
        smoke_lr=2e-3,
    )
