"""MnasNet-B1 (Tan et al. 2019) and FBNet-C (Wu et al. 2019): searched MBConv stacks, built by
the shared stage-table builder :class:`jaxcnn.models.efficientnet.MBConvNet`.

* MnasNet: ``mnasnet_100`` is the B1 network of the reference code (MnasNet without SE, the
  variant torchvision's ``mnasnet1_0`` and timm's ``mnasnet_100`` implement): a
  depthwise-separable first block without residual, MBConv3/6 stages with 3x3 and 5x5 kernels,
  ReLU. The searched per-stage (kernel, expansion, repeats) are the table below.
* FBNet-C (Wu et al. 2019, Fig. 4 / Table 1 search space, the "C" architecture of Fig. 4):
  the DNAS picked, per layer, kernel 3 or 5 and expansion 1, 3 or 6 (or skip), so stages mix
  rows; 16-channel stem, 1984-wide head, ReLU. The search itself is not implemented here.

Twins: timm ``mnasnet_*`` (same counts as torchvision ``mnasnet*`` at widths 0.5/0.75/1.0) and
``fbnetc_100``; PyTorch padding, BN eps 1e-5.
"""

from ..convert import register_renames
from ..registry import register
from .efficientnet import MBCONV_RENAMES, MBConvNet, Row

register_renames('mnasnet', MBCONV_RENAMES)

# (kind, repeats, kernel, first stride, expansion, out channels); MnasNet-B1 stages 112 -> 7 px.
MNASNET_B1 = (
    (Row('ds', 1, 3, 1, 1, 16, skip=False),),
    (Row('ir', 3, 3, 2, 3, 24),),
    (Row('ir', 3, 5, 2, 3, 40),),
    (Row('ir', 3, 5, 2, 6, 80),),
    (Row('ir', 2, 3, 1, 6, 96),),
    (Row('ir', 4, 5, 2, 6, 192),),
    (Row('ir', 1, 3, 1, 6, 320, skip=False),),
)

# FBNet-C: the searched block of every layer (expansion 1 blocks keep their 1x1 expansion conv).
FBNET_C = (
    (Row('ir', 1, 3, 1, 1, 16),),
    (Row('ir', 1, 3, 2, 6, 24), Row('ir', 2, 3, 1, 1, 24)),
    (
        Row('ir', 1, 5, 2, 6, 32),
        Row('ir', 1, 5, 1, 3, 32),
        Row('ir', 1, 5, 1, 6, 32),
        Row('ir', 1, 3, 1, 6, 32),
    ),
    (Row('ir', 1, 5, 2, 6, 64), Row('ir', 1, 5, 1, 3, 64), Row('ir', 2, 5, 1, 6, 64)),
    (Row('ir', 3, 5, 1, 6, 112), Row('ir', 1, 5, 1, 3, 112)),
    (Row('ir', 4, 5, 2, 6, 184),),
    (Row('ir', 1, 3, 1, 6, 352),),
)

# Counts: timm 1.0.31, 1000 classes (torchvision mnasnet0_5/0_75/1_0 have the same counts).
for _w, _count in [(1.0, 4_383_312), (0.5, 2_218_512)]:
    _name = f'mnasnet_{round(_w * 100):03d}'
    register(
        _name,
        MBConvNet,
        dict(
            stages=MNASNET_B1,
            width_mult=_w,
            stem_width=32,
            num_features=1280,
            head_scaling='fixed',
            act='relu',
            drop_rate=0.2,
        ),
        family='mnasnet',
        input_size=(224, 224, 3),
        min_input=32,
        reference=f'timm {_name} (Tan et al. 2019, MnasNet-B1, width {_w})',
        reference_params=_count,
        torch_name=f'timm:{_name}',
    )

register(
    'fbnetc_100',
    MBConvNet,
    dict(
        stages=FBNET_C,
        stem_width=16,
        num_features=1984,
        head_scaling='fixed',
        act='relu',
        drop_rate=0.2,
    ),
    family='mnasnet',
    input_size=(224, 224, 3),
    min_input=32,
    reference='timm fbnetc_100 (Wu et al. 2019, FBNet-C, Fig. 4)',
    reference_params=5_572_200,
    torch_name='timm:fbnetc_100',
)
