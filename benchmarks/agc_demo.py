"""Does Adaptive Gradient Clipping matter? A small NF-ResNet on Fashion-MNIST at a large batch
and learning rate, trained twice with the nfnet_f0 recipe: once with AGC (lambda = 0.01, as in
the recipe), once without. Everything else -- data order, initialisation, schedule -- is equal.

    python benchmarks/agc_demo.py --workdir /tmp/agc_demo          # both runs + figure
    python -m jaxcnn.train --config benchmarks/agc_demo.py:agc   --workdir /tmp/a
    python -m jaxcnn.train --config benchmarks/agc_demo.py:noagc --workdir /tmp/b

This file is also the runs' config (``get_config``); ``--lr`` / ``--steps`` / ``--batch`` of
``main`` become ``--config.*`` overrides. A run that blows up stops at the trainer's NaN check;
the figure marks where.
"""

import argparse
import json
import os
import sys

from ml_collections import ConfigDict

from jaxcnn.config import check_arg, load_config

DEFAULTS = dict(lr=0.8, batch=512, steps=40)


def get_config(arg=None):
    check_arg('agc_demo', arg, valid=('agc', 'noagc'))
    c, _ = load_config('nfnet_f0:fmnist')
    c.model = 'nf_resnet50'  # the NF-ResNet builder, shrunk to 3 stages of one block
    c.model_fallback = ''
    c.model_kwargs = ConfigDict(
        dict(
            depths=(1, 1, 1),
            channels=(16, 32, 64),
            stem='cifar',
            stem_width=16,
            drop_rate=0.0,
            drop_path_rate=0.0,
        )
    )
    c.image_size = c.test_image_size = 28
    c.augment.update(dict(crop_padding=0, mixup=0.0, cutmix=0.0))
    c.batch_size = DEFAULTS['batch']
    c.optim.lr = DEFAULTS['lr']  # x B/256 ('per_256' scaling of the recipe): 1.6 at 512
    c.num_steps = DEFAULTS['steps']
    c.schedule.warmup_steps = 5
    c.train_subset = 0
    c.test_subset = 2000
    c.eval_every_steps = 20
    c.checkpoint_every_steps = 10_000
    c.log_every_steps = 5
    c.ema_decay = 0.0
    c.progress = False
    c.optim.agc_clip = 0.01 if arg != 'noagc' else 0.0
    return c


def _records(workdir):
    path = os.path.join(workdir, 'metrics.jsonl')
    if not os.path.exists(path):
        return []
    return [json.loads(l) for l in open(path)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog='python benchmarks/agc_demo.py')
    p.add_argument('--workdir', default='/tmp/agc_demo')
    p.add_argument('--lr', type=float, default=DEFAULTS['lr'], help='per 256 images')
    p.add_argument('--batch', type=int, default=DEFAULTS['batch'])
    p.add_argument('--steps', type=int, default=DEFAULTS['steps'])
    p.add_argument('--out', default=None, help='figure path (default WORKDIR/agc_demo.png)')
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    from jaxcnn import train

    here = os.path.abspath(__file__)
    summary = {}
    for arg in ('agc', 'noagc'):
        wd = os.path.join(a.workdir, arg)
        if os.path.isdir(wd):
            import shutil

            shutil.rmtree(wd)
        argv_run = [
            '--config',
            f'{here}:{arg}',
            '--workdir',
            wd,
            f'--config.optim.lr={a.lr}',
            f'--config.batch_size={a.batch}',
            f'--config.num_steps={a.steps}',
        ]
        diverged = None
        try:
            if train.main(argv_run) != 0:  # the trainer's NaN check ends a diverged run with rc 1
                diverged = 'non-finite loss or parameters'
        except Exception as e:  # noqa: BLE001 -- report whatever stopped the run, keep the other
            diverged = str(e)
            print(f'[{arg}] stopped: {e}')
        recs = _records(wd)
        train_recs = [r for r in recs if r['kind'] == 'train']
        evals = [r for r in recs if r['kind'] == 'eval']
        summary[arg] = dict(
            diverged=diverged,
            train=[(r['step'], r['loss']) for r in train_recs],
            eval=[(r['step'], r['accuracy'], r['loss']) for r in evals],
        )
    with open(os.path.join(a.workdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    out = a.out or os.path.join(a.workdir, 'agc_demo.png')
    _plot(summary, out, a)
    for arg, s in summary.items():
        last = s['eval'][-1] if s['eval'] else None
        print(
            f'{arg:6s}: '
            + (f'diverged ({s["diverged"]})' if s['diverged'] else 'finished')
            + (
                f'; last eval step {last[0]}: accuracy {last[1]:.4f}, loss {last[2]:.4f}'
                if last
                else ''
            )
        )
    print(f'wrote {out}')
    return 0


def _plot(summary, out, a):
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arg, label in (('agc', 'with AGC (lambda=0.01)'), ('noagc', 'without AGC')):
        s = summary[arg]
        if s['train']:
            steps, losses = zip(*s['train'])
            (line,) = axes[0].plot(steps, losses, label=label)
            if s['diverged']:
                axes[0].axvline(
                    steps[-1], color=line.get_color(), ls=':', label=f'{label}: NaN after here'
                )
        if s['eval']:
            steps, acc, _ = zip(*s['eval'])
            axes[1].plot(steps, acc, marker='o', label=label)
    axes[0].set(xlabel='step', ylabel='train loss', yscale='log')
    axes[1].set(xlabel='step', ylabel='test accuracy', ylim=(0, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f'NF-ResNet on Fashion-MNIST, batch {a.batch}, lr {a.lr} per 256 '
        f'({a.lr * a.batch / 256:g}), Nesterov SGD'
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    sys.exit(main())
