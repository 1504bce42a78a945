"""Learning-rate range test: `python -m jaxcnn.lr_find --config NAME [--min_lr 1e-6] [--max_lr 10]`.

Trains from the config's initial state while the learning rate grows exponentially from
`min_lr` to `max_lr` over `steps` steps, records the smoothed loss, stops once it exceeds
`diverge` times its best value, and writes lr_find.png (loss against lr, log scale) and
lr_find.json in the workdir. The suggested learning rate is the point of steepest descent of
the smoothed loss; the minimum's lr / 10 is printed too (Smith, "Cyclical Learning Rates for
Training Neural Networks", WACV 2017, arXiv:1506.01186, §3.3).

The sweep reuses the trainer's data path, model and train step. The optimiser is the
config's with a constant learning rate of 1, followed by a scale by the swept lr: optax's
chains apply the learning rate as the last multiplication, so this is the same update as
the optimiser run at the swept lr.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import numpy as np
import optax

from jaxcnn import config as config_lib
from jaxcnn import optim
from jaxcnn import sharding
from jaxcnn import train as train_lib
from jaxcnn import kernels

FLAGS = {'min_lr': 1e-6, 'max_lr': 10.0, 'steps': 200, 'smoothing': 0.05, 'diverge': 4.0}


def sweep_lr(step, min_lr: float, max_lr: float, steps: int):
    """Exponential ramp: min_lr at step 0, max_lr at step `steps - 1`."""
    t = step / max(steps - 1, 1)
    return min_lr * (max_lr / min_lr) ** t


def smooth(losses, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (weight `beta` on each new value)."""
    out, avg = [], 0.0
    for i, x in enumerate(losses):
        avg = (1 - beta) * avg + beta * x
        out.append(avg / (1 - (1 - beta) ** (i + 1)))
    return np.asarray(out)


def suggest(lrs, smoothed, skip_start: int = 5):
    """(steepest-descent lr, lr at the minimum / 10) of a smoothed loss curve."""
    lrs, smoothed = np.asarray(lrs), np.asarray(smoothed)
    i_min = int(np.argmin(smoothed))
    lr_min10 = float(lrs[i_min] / 10)
    lo = min(skip_start, max(i_min - 1, 0))
    if i_min - lo < 2:  # Too few points before the minimum for a slope.
        return lr_min10, lr_min10
    slopes = np.gradient(smoothed[lo : i_min + 1], np.log(lrs[lo : i_min + 1]))
    return float(lrs[lo + int(np.argmin(slopes))]), lr_min10


def plot(path, lrs, losses, smoothed, steepest, lr_min10):
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses, alpha=0.3, label='loss')
    ax.plot(lrs, smoothed, label='smoothed loss')
    ax.axvline(steepest, color='C2', ls='--', label=f'steepest descent {steepest:.2e}')
    ax.axvline(lr_min10, color='C3', ls=':', label=f'min / 10 {lr_min10:.2e}')
    ax.set_xscale('log')
    finite = smoothed[np.isfinite(smoothed)]
    if finite.size:  # Keep the divergence from flattening the interesting part.
        ax.set_ylim(finite.min() - 0.1 * abs(finite.min()), min(finite.max(), 2 * finite[0]) * 1.05)
    ax.set_xlabel('learning rate')
    ax.set_ylabel('training loss')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    config, run_name, workdir, flags = config_lib.parse_args(
        sys.argv[1:] if argv is None else argv, tool='jaxcnn.lr_find', extra_flags=FLAGS
    )
    if not 0 < flags['min_lr'] < flags['max_lr'] or flags['steps'] < 10:
        raise ValueError(
            f'Need 0 < min_lr < max_lr and steps >= 10; got min_lr={flags["min_lr"]}, '
            f'max_lr={flags["max_lr"]}, steps={flags["steps"]}.'
        )
    workdir = workdir + '_lr_find' if workdir == os.path.join('workdirs', run_name) else workdir
    n = int(flags['steps'])

    # == Mesh, input, model (as in jaxcnn.train) =================================================
    sharding.maybe_initialize_distributed(config)
    mesh = sharding.make_mesh(config.get('num_devices', -1))
    sharding.check_batch_size(config.batch_size, mesh)
    model_name = train_lib.resolve_model_name(config)
    ds, train_arrays, _, host_iter, (mean, std) = train_lib.load_data(config, mesh, model_name)
    channels = len(mean)
    image_size = int(config.image_size)
    num_train = ds.num_train
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f'batch_size={config.batch_size} is larger than the {num_train} training '
            f'examples; lower --config.batch_size.'
        )
    model = train_lib.create_model(config, model_name)

    # == Optimiser at lr 1, scaled by the sweep ==================================================
    config.optim.lr = 1.0
    config.optim.lr_scaling = 'none'
    config.schedule.name = 'constant'
    config.schedule.warmup_epochs = 0.0
    config.schedule.warmup_steps = -1
    config.ema_decay = 0.0
    lr_at = lambda count: sweep_lr(count, flags['min_lr'], flags['max_lr'], n)

    def build_tx(params):
        base, _ = optim.build_optimizer(config, params, steps_per_epoch, n, config.batch_size)
        return optax.chain(base, optax.scale_by_schedule(lr_at))

    state, state_shardings = train_lib.init_state(
        config, model, (image_size, image_size, channels), mesh, build_tx
    )
    tx = build_tx(state.params)
    step_fn = jax.jit(
        train_lib.make_train_step(config, model, tx, mean, std, image_size, config.num_classes),
        donate_argnums=(0,),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        compiler_options=kernels.model_compiler_options(
            model,
            {'params': state.params, 'batch_stats': state.batch_stats},
            (image_size, image_size, channels),
        ),
    )

    # == Sweep ===================================================================================
    lrs, losses, best = [], [], math.inf
    for step in range(n):
        batch = train_lib.train_batch(config, step, steps_per_epoch, num_train, mesh, host_iter)
        state, m = step_fn(state, train_arrays, batch)
        loss = float(m['loss'])
        lrs.append(lr_at(step))
        losses.append(loss)
        smoothed_now = smooth(losses, flags['smoothing'])[-1]
        if not math.isfinite(loss) or smoothed_now > flags['diverge'] * best:
            train_lib.log(f'Loss diverged at lr {lrs[-1]:.3g} (step {step}); stopping the sweep.')
            break
        best = min(best, smoothed_now)

    # == Suggestion and plot =====================================================================
    finite = [i for i, l in enumerate(losses) if math.isfinite(l)]
    lrs_f = [lrs[i] for i in finite]
    smoothed = smooth([losses[i] for i in finite], flags['smoothing'])
    if len(lrs_f) < 3:
        raise ValueError(f'The loss diverged within {len(lrs_f)} steps; lower --min_lr.')
    steepest, lr_min10 = suggest(lrs_f, smoothed)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)  # only once there is something to write
        plot(
            os.path.join(workdir, 'lr_find.png'),
            lrs_f,
            [losses[i] for i in finite],
            smoothed,
            steepest,
            lr_min10,
        )
        with open(os.path.join(workdir, 'lr_find.json'), 'w') as f:
            json.dump(
                {'lr': lrs, 'loss': losses, 'suggested_lr': steepest, 'min_lr_div10': lr_min10},
                f,
                indent=1,
            )
    train_lib.log(
        f'Suggested lr: {steepest:.3g} (steepest descent); minimum-loss lr / 10: '
        f'{lr_min10:.3g}. Plot: {os.path.join(workdir, "lr_find.png")}'
    )
    return 0


def cli() -> None:
    config_lib.run_cli(main)


if __name__ == '__main__':
    cli()
