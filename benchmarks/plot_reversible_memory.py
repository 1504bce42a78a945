"""The bar chart of docs/reversible.md from the bench's memory record.

    python benchmarks/plot_reversible_memory.py benchmarks/results/memory_remat_cifar_b128.json docs/reversible_memory.png

The record is that of docs/reversible.md's ``python -m jaxcnn.bench memory`` command: each depth
gets the reversible RevNet, the same RevNet under ordinary autodiff with stored and with
rematerialised activations, and the ResNet of its depth class, stored, rematerialised block by
block, and rematerialised inside a scanned stage.
"""

import json
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

GROUPS = (
    ('depth 38 / 32', 'revnet38', 'resnet32'),
    ('depth 110', 'revnet110', 'resnet110'),
    ('depth 164', 'revnet164', 'resnet164'),
)
SERIES = (
    ('RevNet, reversible', '{rev}', 'tab:green'),
    ('RevNet, stored', '{rev}:plain', 'tab:orange'),
    ('RevNet, remat', '{rev}:plain:remat=True', 'tab:red'),
    ('ResNet, stored', '{res}', 'tab:blue'),
    ('ResNet, remat', '{res}:remat=True', 'tab:purple'),
    ('ResNet, scanned + remat', '{res}:scan_blocks=True:remat=True', 'tab:gray'),
)


def main(record_path, png_path):
    with open(record_path) as f:
        record = json.load(f)
    peak = {r['model']: r['peak_bytes'] / 2**20 for r in record['results']}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(SERIES)
    for i, (label, pattern, color) in enumerate(SERIES):
        heights = [peak[pattern.format(rev=rev, res=res)] for _, rev, res in GROUPS]
        offset = (i - (len(SERIES) - 1) / 2) * width
        ax.bar([g + offset for g in range(len(GROUPS))], heights, width, label=label, color=color)
    ax.set_xticks(range(len(GROUPS)), [name for name, _, _ in GROUPS])
    ax.set(
        ylabel='peak MiB, one training step', title='CIFAR, batch 128, fp32 (XLA memory analysis)'
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f'wrote {png_path}')


if __name__ == '__main__':
    main(*sys.argv[1:3])
