"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3 large/small (Howard et al. 2019).

Both are stage tables for the shared builder :class:`jaxcnn.models.efficientnet.MBConvNet`:
the tables below are the papers' tables as data, turned into builder rows by one function each.

* MobileNetV2, Table 2: rows (t, c, n, s) = expansion, output channels, repeats, first stride,
  after a 32-channel stride-2 stem, and a 1x1 conv to 1280 (never narrowed by the width
  multiplier) before pooling. ReLU6 everywhere except after the projection ("linear
  bottleneck"); the t = 1 row has no expansion conv (a depthwise-separable block).
* MobileNetV3, Tables 1 and 2: rows (kernel, exp size, #out, SE, NL, s) with absolute expansion
  widths; h-swish (x ReLU6(x + 3) / 6) in the later layers, SE (a quarter of the expanded width,
  ReLU, hard-sigmoid gate) on the marked rows, and the "efficient last stage" (Fig. 5): 1x1 conv
  to 960 (576), pool, then a 1x1 conv without BN to 1280 (1024) with h-swish before the classifier.

Twins: timm ``mobilenetv2_*`` (= torchvision ``mobilenet_v2`` at width 1.0) and
``mobilenetv3_*`` (same counts as torchvision's ``mobilenet_v3_*``); PyTorch padding, BN eps 1e-5.
"""

from ..convert import register_renames
from .efficientnet import MBCONV_RENAMES, MBConvNet, Row, round_channels  # noqa: F401
from ..registry import register

register_renames('mobilenet', MBCONV_RENAMES)

# Sandler et al. 2018, Table 2: (t, c, n, s) per bottleneck sequence (224 -> 7 px).
MOBILENETV2_TABLE = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenetv2_stages(table=MOBILENETV2_TABLE):
    """One stage per (t, c, n, s) row; t = 1 is a depthwise-separable block (no expansion)."""
    return tuple((Row('ds' if t == 1 else 'ir', n, 3, s, t, c),) for t, c, n, s in table)


# Howard et al. 2019, Table 1 (large) and Table 2 (small): (kernel, exp size, #out, SE, NL, s),
# grouped into the stages timm numbers its blocks by; the last row of each is the 1x1 conv
# before pooling (NL: 'RE' = ReLU, 'HS' = h-swish).
MOBILENETV3_LARGE_TABLE = (
    ((3, 16, 16, False, 'RE', 1),),
    ((3, 64, 24, False, 'RE', 2), (3, 72, 24, False, 'RE', 1)),
    ((5, 72, 40, True, 'RE', 2), (5, 120, 40, True, 'RE', 1), (5, 120, 40, True, 'RE', 1)),
    (
        (3, 240, 80, False, 'HS', 2),
        (3, 200, 80, False, 'HS', 1),
        (3, 184, 80, False, 'HS', 1),
        (3, 184, 80, False, 'HS', 1),
    ),
    ((3, 480, 112, True, 'HS', 1), (3, 672, 112, True, 'HS', 1)),
    ((5, 672, 160, True, 'HS', 2), (5, 960, 160, True, 'HS', 1), (5, 960, 160, True, 'HS', 1)),
    ((1, None, 960, False, 'HS', 1),),
)
MOBILENETV3_SMALL_TABLE = (
    ((3, 16, 16, True, 'RE', 2),),
    ((3, 72, 24, False, 'RE', 2), (3, 88, 24, False, 'RE', 1)),
    ((5, 96, 40, True, 'HS', 2), (5, 240, 40, True, 'HS', 1), (5, 240, 40, True, 'HS', 1)),
    ((5, 120, 48, True, 'HS', 1), (5, 144, 48, True, 'HS', 1)),
    ((5, 288, 96, True, 'HS', 2), (5, 576, 96, True, 'HS', 1), (5, 576, 96, True, 'HS', 1)),
    ((1, None, 576, False, 'HS', 1),),
)


def mobilenetv3_stages(table, stem: int = 16):
    """Builder rows from a MobileNetV3 table: the absolute expansion width becomes a ratio of
    the row's input width (so width multipliers scale it), an expansion equal to the input is a
    depthwise-separable block, ``None`` a plain 1x1 conv; consecutive rows that differ only in
    stride 1 merge into one row with repeats, as the builder's depth scaling expects."""
    stages, in_ch = [], stem
    for stage in table:
        rows = []
        for k, exp, out, se, nl, s in stage:
            act = 'relu' if nl == 'RE' else 'hard_swish'
            if exp is None:
                row = Row('cn', 1, k, s, 1, out, act=act)
            else:
                kind = 'ds' if exp == in_ch else 'ir'
                row = Row(kind, 1, k, s, exp / in_ch, out, 0.25 if se else 0.0, act)
            prev = rows[-1] if rows else None
            if prev and s == 1 and prev._replace(repeats=1, stride=1) == row._replace(stride=1):
                rows[-1] = prev._replace(repeats=prev.repeats + 1)
            else:
                rows.append(row)
            in_ch = out
        stages.append(tuple(rows))
    return tuple(stages)


MOBILENETV3_LARGE = mobilenetv3_stages(MOBILENETV3_LARGE_TABLE)
MOBILENETV3_SMALL = mobilenetv3_stages(MOBILENETV3_SMALL_TABLE)

# Counts: timm 1.0.31, 1000 classes (width 1.0 equals torchvision 0.29.1 mobilenet_v2).
for _w, _count in [(1.0, 3_504_872), (0.5, 1_968_680), (1.4, 6_108_776)]:
    _name = f'mobilenetv2_{round(_w * 100):03d}'
    register(
        _name,
        MBConvNet,
        dict(
            stages=mobilenetv2_stages(),
            width_mult=_w,
            stem_width=32,
            num_features=1280,
            head_scaling='at_least',
            act='relu6',
            drop_rate=0.2,
        ),
        family='mobilenet',
        input_size=(224, 224, 3),
        min_input=32,
        reference=f'timm {_name} (Sandler et al. 2018, Table 2, width {_w})',
        reference_params=_count,
        torch_name=f'timm:{_name}',
    )

for _size, _stages, _nf, _variants in [
    ('large', MOBILENETV3_LARGE, 1280, [(1.0, 5_483_032), (0.75, 3_993_528)]),
    ('small', MOBILENETV3_SMALL, 1024, [(1.0, 2_542_856), (0.75, 2_041_872), (0.5, 1_593_224)]),
]:
    for _w, _count in _variants:
        _name = f'mobilenetv3_{_size}_{round(_w * 100):03d}'
        register(
            _name,
            MBConvNet,
            dict(
                stages=_stages,
                width_mult=_w,
                stem_width=16,
                fix_stem=_w < 0.75,
                num_features=_nf,
                head_scaling='fixed',
                head='pooled_linear',
                act='hard_swish',
                se_from_exp=True,
                se_act='relu',
                se_gate='hard_sigmoid',
                drop_rate=0.2,
            ),
            family='mobilenet',
            input_size=(224, 224, 3),
            min_input=32,
            reference=f'timm {_name} (Howard et al. 2019, Table {1 if _size == "large" else 2}, '
            f'width {_w})',
            reference_params=_count,
            torch_name=f'timm:{_name}',
        )
