"""Trains a jaxcnn model: `python -m jaxcnn.train --config NAME[:arg] [--config.k=v] [--workdir D]`.

One linear `main()` in sections, read top to bottom: distributed setup and mesh, input,
model, optimiser, train step, checkpoint, evaluation, loop, final report.

Data parallelism is `jax.jit` over a 1-D ('data',) mesh (see jaxcnn/sharding.py). In-memory
datasets (Fashion-MNIST, npz, folders) live on the devices as uint8, replicated; each step
receives only the batch's indices, taken from a permutation fixed by (seed, epoch), and the
step gathers, augments and normalises inside the compiled function. TFDS datasets are read
by a host iterator instead. Every run resumes from the newest checkpoint in its workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import shutil
import signal
import time
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import jaxcnn
from jaxcnn import checkpoint as ckpt_lib
from jaxcnn import config as config_lib
from jaxcnn import data as data_lib
from jaxcnn import metrics as metrics_lib
from jaxcnn import optim
from jaxcnn import sharding
from jaxcnn import transfer as transfer_lib
from jaxcnn import kernels


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # number of optimiser updates done
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    opt_state: Any
    ema_params: Any  # None when config.ema_decay == 0
    rng: jax.Array  # base key; step keys are fold_in(rng, step)


class TrainingError(RuntimeError):
    """A run that must stop with a non-zero exit status (e.g. a non-finite loss)."""


def log(msg: str) -> None:
    """A line of the run's log (process 0), written above any progress bar, never on its line."""
    if jax.process_index() == 0:
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def interactive() -> bool:
    """Whether progress is drawn as a bar: a terminal that reports its width (some report 0
    columns, where a bar would stay silent); elsewhere (a file, CI, a cluster log) plain lines."""
    return sys.stderr.isatty() and shutil.get_terminal_size((0, 0)).columns > 0


# ---------------------------------------------------------------------------------------------
# Pieces shared with lr_find: they are the sections of main(), cut out so both tools run the
# very same data path, model and step.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of one epoch: a function of (seed, epoch) only, hence resumable."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def train_batch(config, step: int, steps_per_epoch: int, num_train: int, mesh, host_iter):
    """The global batch of training step `step` (0-based), sharded on 'data'.

    In-memory data: this process's share of the batch's indices into the device-resident
    dataset (the last partial batch of an epoch is dropped). TFDS: the next host batch.
    """
    if host_iter is not None:
        return sharding.host_to_global(next(host_iter), mesh)
    epoch, i = divmod(step, steps_per_epoch)
    idx = epoch_permutation(config.seed, epoch, num_train)[
        i * config.batch_size : (i + 1) * config.batch_size
    ]
    return sharding.host_to_global({'idx': idx[sharding.process_slice(len(idx))]}, mesh)


def resolve_model_name(config) -> str:
    """config.model, or config.model_fallback (with a log line) when it is not registered yet."""
    available = jaxcnn.list_models()
    if config.model in available:
        return config.model
    fallback = config.get('model_fallback', '')
    if fallback and fallback in available:
        log(
            f'Model {config.model!r} is not registered in this jaxcnn; using stand-in '
            f'{fallback!r} (config.model_fallback).'
        )
        return fallback
    jaxcnn.model_info(config.model)  # Raises ValueError naming the closest models.
    return config.model


def model_stats(config, model_name: str, channels: int | None):
    """The model's mean/std when config.normalization == 'model' (and they fit), else None:
    those the pretrained weights of ``config.init_from`` were trained with when it names hub
    weights or a file with a config.json beside it, else the model's registry entry."""
    if config.get('normalization', 'dataset') != 'model':
        return None
    init_from = str(config.get('init_from', '') or '')
    from jaxcnn import hub

    if init_from.startswith(('hf:', 'hf-hub:')) or init_from and hub.config_beside(init_from):
        cfg = hub.weights_config(init_from, model_name)
        mean, std, source = cfg['mean'], cfg['std'], f'the weights of {init_from}'
    else:
        info = jaxcnn.model_info(model_name)
        mean, std, source = info.mean, info.std, model_name
    if channels is not None and len(mean) != channels:
        log(
            f'normalization=model: {source} has {len(mean)}-channel statistics but the data '
            f'has {channels} channel(s); using the dataset statistics instead.'
        )
        return None
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_data(config, mesh, model_name: str):
    """Returns (ds, train_arrays, test_arrays, host_iter, (mean, std)).

    In-memory datasets: the uint8 images and int labels go to every device once, replicated;
    host_iter is None. 'tfds:' datasets: the arrays are None and host_iter yields this
    process's share of each training batch, already normalised, cropped and flipped on the host.
    """
    if str(config.dataset).startswith('tfds:'):  # The host pipeline normalises.
        ds = data_lib.load_dataset(config, *(model_stats(config, model_name, None) or (None, None)))
        return ds, None, None, ds.train_iter(config.batch_size, seed=config.seed), (ds.mean, ds.std)
    ds = data_lib.load_dataset(config)
    if config.get('train_subset', 0) > 0:  # Tests and quick experiments: a fixed prefix.
        ds = dataclasses.replace(
            ds,
            train_images=ds.train_images[: config.train_subset],
            train_labels=ds.train_labels[: config.train_subset],
        )
    if config.get('test_subset', 0) > 0:
        ds = dataclasses.replace(
            ds,
            test_images=ds.test_images[: config.test_subset],
            test_labels=ds.test_labels[: config.test_subset],
        )
    stats = model_stats(config, model_name, ds.image_shape[-1]) or (ds.mean, ds.std)
    train = sharding.replicate((ds.train_images, ds.train_labels.astype(np.int32)), mesh)
    test = sharding.replicate((ds.test_images, ds.test_labels.astype(np.int32)), mesh)
    return ds, train, test, None, stats


def create_model(config, model_name: str):
    dtype = jnp.bfloat16 if config.get('bf16', False) else jnp.float32
    kwargs = dict(config.get('model_kwargs', {}) or {})
    if dtype != jnp.float32:
        kwargs['dtype'] = dtype  # Compute in bf16; parameters stay float32 (param_dtype).
    return jaxcnn.create_model(model_name, num_classes=config.num_classes, **kwargs)


def init_state(config, model, input_shape, mesh, build_tx):
    """Initialises the train state directly on the devices, replicated.

    `build_tx(params)` returns the optax transformation. jax.eval_shape gives the structure
    first, so the jitted init can be told its output shardings (big_vision's pattern).
    """

    def init(rng):
        init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
        dummy = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
        variables = model.init({'params': init_rng, 'dropout': dropout_rng}, dummy, train=False)
        params = variables['params']
        tx = build_tx(params)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get('batch_stats', {}),
            opt_state=tx.init(params),
            ema_params=params if config.get('ema_decay', 0.0) > 0 else None,
            rng=state_rng,
        )

    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(init, rng)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    return jax.jit(init, out_shardings=shardings)(rng), shardings


def transfer_init(
    config, model_name, model, state, ds, train_arrays, test_arrays, stats, image_size, mesh
):
    """Pretrained weights everywhere but the head; then, if transfer.head_steps > 0, the head
    fitted alone on backbone features computed once (jaxcnn/transfer.py)."""
    pretrained = transfer_lib.load_pretrained(config.init_from, model_name)
    variables = {'params': state.params}
    if state.batch_stats:
        variables['batch_stats'] = state.batch_stats
    variables = transfer_lib.merge_pretrained(variables, pretrained, config.transfer.trainable)
    log(
        f'Loaded pretrained weights from {config.init_from}; new head for '
        f'{config.num_classes} classes.'
    )
    head_steps = int(config.transfer.head_steps)
    if head_steps > 0:
        if train_arrays is None:
            raise ValueError(
                'transfer.head_steps needs an in-memory dataset (fmnist, npz, folder); '
                'set --config.transfer.head_steps=0 for TFDS datasets'
            )
        mean, std = stats

        def preprocess(x):
            x = data_lib.normalize(x, mean, std)
            return data_lib.resize(x, image_size) if x.shape[1] != image_size else x

        backbone = jaxcnn.create_model(
            model_name, num_classes=0, **dict(config.get('model_kwargs', {}) or {})
        )
        feats = {
            split: transfer_lib.extract_features(backbone, variables, images, preprocess=preprocess)
            for split, images in (('train', ds.train_images), ('test', ds.test_images))
        }
        head = transfer_lib.fit_head(
            feats['train'],
            ds.train_labels,
            config.num_classes,
            steps=head_steps,
            lr=float(config.transfer.head_lr),
            seed=config.seed,
        )
        acc = transfer_lib.head_accuracy(head, feats['test'], ds.test_labels)
        log(
            f'Head trained on cached {feats["train"].shape[1]}-d features for {head_steps} steps: '
            f'test accuracy {acc * 100:.2f}% before fine-tuning.'
        )
        variables['params'] = transfer_lib.set_head(variables['params'], head)
    replicated = lambda tree: jax.device_put(tree, sharding.replicated(mesh))
    ema = replicated(variables['params']) if state.ema_params is not None else None
    return state.replace(
        params=replicated(variables['params']),
        batch_stats=replicated(variables.get('batch_stats', {})),
        ema_params=ema,
    )


@dataclasses.dataclass(frozen=True)
class TrainPhase:
    """What changes between the stages of progressive learning: from ``start_step`` on, train
    at ``image_size`` pixels with this dropout rate and MixUp alpha (None: the recipe's own)."""

    start_step: int
    image_size: int
    drop_rate: float | None = None
    mixup: float | None = None


def progressive_phases(config, total_steps: int, image_size: int, model) -> list[TrainPhase]:
    """The training phases of config.progressive (Tan & Le 2021, Algorithm 1): M equal stages,
    stage i at S_0 + (S_e - S_0) i / (M - 1) pixels, each scheduled regulariser interpolated the
    same way from its start value to the recipe's value. One phase when progressive is off."""
    p = config.progressive
    m = int(p.stages)
    if m <= 1:
        return [TrainPhase(0, image_size)]
    if total_steps < m:
        raise ValueError(
            f'progressive.stages={m} needs at least {m} training steps, the run has '
            f'{total_steps}; lower --config.progressive.stages.'
        )
    if p.start_drop_rate >= 0 and not hasattr(model, 'drop_rate'):
        raise ValueError(
            f'progressive.start_drop_rate: {type(model).__name__} has no drop_rate '
            f'argument; set --config.progressive.start_drop_rate=-1.'
        )
    end_mixup = float(config.augment.get('mixup', 0.0) or 0.0)
    lerp = lambda start, end, i: start + (end - start) * i / (m - 1)
    phases = []
    for i in range(m):
        phases.append(
            TrainPhase(
                start_step=round(i * total_steps / m),
                image_size=(
                    round(lerp(p.start_image_size, image_size, i))
                    if p.start_image_size > 0
                    else image_size
                ),
                drop_rate=lerp(p.start_drop_rate, model.drop_rate, i)
                if p.start_drop_rate >= 0
                else None,
                mixup=lerp(p.start_mixup, end_mixup, i) if p.start_mixup >= 0 else None,
            )
        )
    return phases


def dense_targets(targets, outputs):
    """Per-image targets (N, classes) at every position of per-pixel logits (N, H, W, classes)
    (dense prediction), else as they are."""
    logits, _ = optim.split_outputs(outputs)
    if logits.ndim == targets.ndim:
        return targets
    shape = (targets.shape[0],) + (1,) * (logits.ndim - targets.ndim) + targets.shape[1:]
    return jnp.broadcast_to(targets.reshape(shape), logits.shape[:-1] + targets.shape[-1:])


def make_batch_fn(config, mean, std, image_size, num_classes, mixup=None):
    """Section 1 of the training step, on its own so that other steps built on the trainer's
    (jaxcnn/search.py's architecture step) see the very same batches: returns
    ``batch_fn(aug_rng, train_arrays, batch) -> (images, targets)``, to call inside the jit.

    In-memory data: gather the rows of this step's indices (sharded on 'data') from the
    replicated uint8 dataset, normalise, resize if the train resolution differs from the stored
    one, then augment (zero padding/Cutout equal the mean after normalising). Host batches arrive
    normalised, cropped and flipped; only the batch-level augmentations are left. Targets are
    soft (MixUp/CutMix). ``mixup`` overrides config.augment.mixup (progressive learning)."""
    aug_cfg = config.augment.to_dict()
    if mixup is not None:
        aug_cfg['mixup'] = mixup
    host_aug_cfg = {**aug_cfg, 'crop_padding': 0, 'flip': False}
    compute_dtype = jnp.bfloat16 if config.get('bf16', False) else jnp.float32

    def batch_fn(aug_rng, train_arrays, batch):
        if train_arrays is not None:
            images, labels = train_arrays[0][batch['idx']], train_arrays[1][batch['idx']]
            images = data_lib.normalize(images, mean, std)
            if images.shape[1:3] != (image_size, image_size):
                images = data_lib.resize(images, image_size)
            images, targets = data_lib.augment_batch(aug_rng, images, labels, aug_cfg, num_classes)
        else:
            images = batch['image']
            if images.shape[1:3] != (
                image_size,
                image_size,
            ):  # Progressive learning's small stages.
                images = data_lib.resize(images, image_size)
            images, targets = data_lib.augment_batch(
                aug_rng, images, batch['label'], host_aug_cfg, num_classes
            )
        return images.astype(compute_dtype), targets

    return batch_fn


def make_train_step(
    config, model, tx, mean, std, image_size, num_classes, bn_train=True, mixup=None
):
    """The whole training update for one global batch, as one function to jit.

    ``bn_train=False`` (a frozen backbone) runs the model in inference mode: BatchNorm uses and
    keeps its running statistics, and dropout is off. ``mixup`` overrides config.augment.mixup
    (progressive learning). Extra positional arguments of the step go to the model after the
    images (the architecture search's mixing weights); the trainer passes none."""
    batch_fn = make_batch_fn(config, mean, std, image_size, num_classes, mixup)
    ema_decay = float(config.get('ema_decay', 0.0))
    smoothing = float(config.get('label_smoothing', 0.0))

    def train_step(state: TrainState, train_arrays, batch, *model_args):
        rng = jax.random.fold_in(state.rng, state.step)
        aug_rng, dropout_rng = jax.random.split(rng)

        # 1. The batch: gathered (or taken from the host), normalised, augmented (make_batch_fn).
        images, targets = batch_fn(aug_rng, train_arrays, batch)

        # 2. Forward and backward. BatchNorm statistics are those of the global batch.
        def loss_fn(params):
            variables = {'params': params}
            if state.batch_stats:
                variables['batch_stats'] = state.batch_stats
            outputs, new_vars = model.apply(
                variables,
                images,
                *model_args,
                train=bn_train,
                rngs={'dropout': dropout_rng},
                mutable=['batch_stats'],
            )
            loss = optim.classification_loss(
                outputs, dense_targets(targets, outputs), num_classes, smoothing
            )
            return loss, (outputs, new_vars.get('batch_stats', {}))

        (loss, (outputs, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )

        # 3. Optimiser update and the moving average of the weights.
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = state.ema_params
        if ema_decay > 0:
            ema_params = optim.ema_update(ema_params, params, ema_decay, step=state.step)

        # 4. Metrics. Loss and accuracy are those of the pre-update parameters; the norm of the
        #    updated ones catches an update that overflowed while the loss still looked finite.
        logits, _ = optim.split_outputs(outputs)
        accuracy = jnp.mean(
            jnp.argmax(logits, -1) == jnp.argmax(dense_targets(targets, logits), -1)
        )
        metrics = {
            'loss': loss,
            'accuracy': accuracy,
            'lr': optim.current_lr(opt_state),
            'grad_norm': optax.global_norm(grads),
            'param_norm': optax.global_norm(params),
        }
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=ema_params,
        )
        return new_state, metrics

    return train_step


def make_eval_step(config, model, mean, std, test_size, num_classes):
    """Sums of loss and correct predictions over one (padded) batch of test indices. Extra
    positional arguments go to the model after the images, as in make_train_step."""
    compute_dtype = jnp.bfloat16 if config.get('bf16', False) else jnp.float32
    eval_mode = config.eval.get('mode', 'center')
    eval_scales = tuple(config.eval.get('scales', (1.0,)))

    def eval_step(params, batch_stats, test_arrays, batch, *model_args):
        if test_arrays is not None:
            images = data_lib.normalize(test_arrays[0][batch['idx']], mean, std)
            labels = test_arrays[1][batch['idx']]
        else:  # Host batches come normalised at the test resolution.
            images, labels = batch['image'], batch['label']
        views = data_lib.eval_views(images, eval_mode, test_size, eval_scales)  # (V, N, h, w, C)
        variables = {'params': params}
        if batch_stats:
            variables['batch_stats'] = batch_stats

        # Test-time augmentation: the softmax averaged over the views (one view for 'center').
        def view_probs(x):
            logits, _ = optim.split_outputs(
                model.apply(variables, x.astype(compute_dtype), *model_args, train=False)
            )
            return jax.nn.softmax(logits.astype(jnp.float32), -1)

        probs = jnp.mean(jax.lax.map(view_probs, views), axis=0)
        mask = batch['mask'].astype(jnp.float32)
        nll = -jnp.log(jnp.take_along_axis(probs, labels[..., None], -1)[..., 0] + 1e-12)
        predicted = jnp.argmax(probs, -1)
        correct = (predicted == labels).astype(jnp.float32)
        sums = {}
        if labels.ndim > 1:  # per-pixel labels: each image's pixel means, and the confusion
            pixels = tuple(range(1, labels.ndim))
            nll, correct = nll.mean(pixels), correct.mean(pixels)
            weight = jnp.broadcast_to(mask.reshape((-1,) + (1,) * len(pixels)), labels.shape)
            sums['confusion'] = (
                jnp.zeros((num_classes, num_classes), jnp.float32)
                .at[labels.ravel(), predicted.ravel()]
                .add(weight.ravel())
            )
        return {
            'loss': jnp.sum(nll * mask),
            'correct': jnp.sum(correct * mask),
            'count': jnp.sum(mask),
            **sums,
        }

    return eval_step


def evaluate(
    eval_step, params, batch_stats, ds, test_arrays, batch_size, mesh, model_args=(), progress=False
):
    """Accuracy and loss over the whole test set, and the mean IoU for per-pixel labels (accuracy
    then counts pixels); padded rows of the last batch are masked.
    ``model_args``: extra inputs of the model, passed through eval_step; ``progress``: a bar of
    its own (cleared when done)."""
    if test_arrays is not None:

        def batches():
            n = ds.num_test
            for start in range(0, n, batch_size):
                idx = np.arange(start, start + batch_size)
                mask = idx < n
                sl = sharding.process_slice(batch_size)
                yield {'idx': np.minimum(idx, n - 1).astype(np.int32)[sl], 'mask': mask[sl]}
    else:
        batches = lambda: ds.eval_iter(batch_size)
    totals = {}
    total = -(-ds.num_test // batch_size) if test_arrays is not None else None
    for batch in tqdm(
        batches(),
        total=total,
        desc='eval',
        unit='batch',
        leave=False,
        dynamic_ncols=True,
        disable=not progress,
    ):
        out = eval_step(
            params, batch_stats, test_arrays, sharding.host_to_global(batch, mesh), *model_args
        )
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
    results = {
        'accuracy': float(totals['correct'] / totals['count']),
        'loss': float(totals['loss'] / totals['count']),
    }
    if 'confusion' in totals:  # per-pixel labels
        results['miou'] = mean_iou(totals['confusion'])
    return results


def mean_iou(confusion) -> float:
    """Mean over classes of the intersection over union, TP / (TP + FP + FN), from a confusion
    matrix (rows: true class, columns: predicted); classes absent from both the labels and the
    predictions are left out, as in the PASCAL VOC and Cityscapes benchmarks."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def first_bad_step(host_metrics):
    """(step, what) of the first [(step, metrics)] entry with a non-finite loss or parameters."""
    for step, m in host_metrics:
        if not math.isfinite(m['loss']):
            return step, f'the loss became {m["loss"]}'
        if not math.isfinite(m['param_norm']):
            return step, f'the parameters became non-finite (loss {m["loss"]:.4g})'
    return None


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    config, run_name, workdir, _ = config_lib.parse_args(sys.argv[1:] if argv is None else argv)
    ckpt_lib.check_workdir(workdir)

    # == Distributed setup and mesh ==============================================================
    sharding.split_host_cpu(config)
    sharding.maybe_initialize_distributed(config)
    mesh = sharding.make_mesh(config.get('num_devices', -1))
    sharding.check_batch_size(config.batch_size, mesh)
    is_main = jax.process_index() == 0
    log(
        f'{run_name}: {mesh.devices.size} device(s) ({jax.devices()[0].platform}), '
        f'{jax.process_count()} process(es), workdir {workdir}'
    )
    if kernels_line := kernels.describe():
        log(kernels_line)

    # == Input ===================================================================================
    model_name = resolve_model_name(config)
    ds, train_arrays, test_arrays, host_iter, (mean, std) = load_data(config, mesh, model_name)
    channels = len(mean)
    image_size = int(config.image_size)
    test_size = int(config.get('test_image_size', 0) or image_size)
    num_train = ds.num_train
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f'batch_size={config.batch_size} is larger than the {num_train} training '
            f'examples; lower --config.batch_size.'
        )
    total_steps = config_lib.duration_steps(config, 'num', steps_per_epoch)
    if total_steps <= 0:
        raise ValueError('Set config.num_epochs or config.num_steps to a positive value.')
    log(
        f'data: {config.dataset}, {num_train} train examples, {steps_per_epoch} steps/epoch, '
        f'{total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs), global batch '
        f'{config.batch_size}, train {image_size}px / test {test_size}px'
    )

    # == Model and optimiser =====================================================================
    model = create_model(config, model_name)
    build_tx = lambda params: optim.build_optimizer(
        config, params, steps_per_epoch, total_steps, config.batch_size
    )[0]
    frozen = bool(config.get('init_from', '')) and config.transfer.freeze_backbone
    if frozen:  # Transfer learning: only the head (transfer.trainable) is updated.
        build_tx = (
            lambda tx: (
                lambda params: transfer_lib.freeze_backbone(tx(params), config.transfer.trainable)
            )
        )(build_tx)
    state, state_shardings = init_state(
        config, model, (image_size, image_size, channels), mesh, build_tx
    )
    tx = build_tx(state.params)
    log(
        f'model: {model_name}, {jaxcnn.count_params(state.params):,} parameters, '
        f'{"bf16" if config.get("bf16", False) else "fp32"} compute'
    )

    # == Train and eval steps ====================================================================
    # XLA options for this model's steps (on the CPU: which library runs its convolutions)
    xla_options = kernels.model_compiler_options(
        model,
        {'params': state.params, 'batch_stats': state.batch_stats},
        (image_size, image_size, channels),
    )
    # One compiled step per training phase (one phase unless config.progressive is on).
    phases = progressive_phases(config, total_steps, image_size, model)

    @functools.lru_cache(maxsize=None)
    def phase_train_step(phase: TrainPhase):
        phase_model = model if phase.drop_rate is None else model.clone(drop_rate=phase.drop_rate)
        step_fn = make_train_step(
            config,
            phase_model,
            tx,
            mean,
            std,
            phase.image_size,
            config.num_classes,
            bn_train=not (frozen and config.transfer.freeze_bn),
            mixup=phase.mixup,
        )
        # The state is donated: its buffers are reused for the new state (halves peak memory).
        return jax.jit(
            step_fn,
            donate_argnums=(0,),
            out_shardings=(state_shardings, sharding.replicated(mesh)),
            compiler_options=xla_options,
        )

    eval_step = jax.jit(
        make_eval_step(config, model, mean, std, test_size, config.num_classes),
        compiler_options=xla_options,
    )
    n_dev = mesh.devices.size
    eval_batch = max(n_dev, (config.get('eval_batch_size', 1000) // n_dev) * n_dev)
    plateau = config.schedule.get('name', '') == 'plateau'
    plateau_update = jax.jit(lambda s, v: optim.plateau_update(s, v, config), donate_argnums=(0,))

    # == Checkpoint: resume from the workdir =====================================================
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, 'checkpoints'), keep=config.get('keep_checkpoints', 3)
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, log=log)
        log(f'Resumed from {ckpt.directory} at step {int(state.step)}.')
        if int(state.step) >= total_steps and os.path.exists(os.path.join(workdir, 'results.json')):
            log(
                f'{workdir} holds a finished run ({int(state.step)} of {total_steps} steps; see its '
                f'results.json): nothing to do. Raise --config.num_steps or --config.num_epochs to '
                f'train it further.'
            )
            ckpt.close()
            return 0
    elif not config.get('init_from', '') and config.transfer.get('head_steps', 0) > 0:
        log('No --config.init_from given: training from scratch (transfer.head_steps ignored).')
    elif config.get('init_from', ''):
        state = transfer_init(
            config,
            model_name,
            model,
            state,
            ds,
            train_arrays,
            test_arrays,
            (mean, std),
            image_size,
            mesh,
        )
    # config.json is written once the config has built a model and its state: a bad override, or
    # a checkpoint it cannot restore, leaves the run's config.json as it was
    if is_main:
        with open(os.path.join(workdir, 'config.json'), 'w') as f:
            f.write(config.to_json_best_effort(indent=2))
    # a resumed run writes again the metrics after its checkpoint's step: drop the old ones
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=int(state.step))
    # training seconds of the run's earlier parts, at the checkpoint it resumed from
    seconds_before = ckpt_lib.train_seconds(workdir, int(state.step))
    ckpt_every = config_lib.duration_steps(config, 'checkpoint_every', steps_per_epoch)
    log_every = max(1, config_lib.duration_steps(config, 'log_every', steps_per_epoch, 50))
    eval_every = config_lib.duration_steps(config, 'eval_every', steps_per_epoch, steps_per_epoch)

    def run_eval(step):
        results = {}
        for prefix, params in (('', state.params), ('ema_', state.ema_params)):
            if params is None:
                continue
            r = evaluate(
                eval_step,
                params,
                state.batch_stats,
                ds,
                test_arrays,
                eval_batch,
                mesh,
                progress=is_main and config.get('progress', True) and interactive(),
            )
            results.update({prefix + k: v for k, v in r.items()})
        writer.write(step, results, kind='eval')
        return results

    # == Training loop ===========================================================================
    stop = ckpt_lib.StopSignal()  # SIGTERM -> save, exit 0; SIGINT (Ctrl-C) -> save, exit 130.
    step = start_step = int(state.step)
    pending = []  # (step, device metrics) not yet fetched: fetching waits for the device.
    eval_results = {}
    t0 = t_log = time.time()
    step_log = step

    def fetch_metrics():
        """Fetches pending metrics; raises on a non-finite loss before anything gets saved."""
        nonlocal pending, t_log, step_log
        host = [(s, jax.tree.map(float, jax.device_get(m))) for s, m in pending]
        pending = []
        bad = first_bad_step(host)
        if bad is not None:
            raise TrainingError(
                f'{bad[1]} at step {bad[0]}; stopped without saving (the last good '
                f'checkpoint is step {ckpt.latest_step()}). Lower the learning rate '
                f'or check the data.'
            )
        if not host:
            return None
        mean_m = {k: float(np.mean([h[k] for _, h in host])) for k in host[-1][1]}
        now = time.time()
        sec_per_step = (now - t_log) / max(step - step_log, 1)
        t_log, step_log = now, step
        mean_m['img_per_sec'] = config.batch_size / max(sec_per_step, 1e-9)
        writer.write(step, mean_m, kind='train')
        mean_m['eta_min'] = (total_steps - step) * sec_per_step / 60
        return mean_m

    # Progress: a bar in a terminal (tqdm's rate and ETA); elsewhere a plain line per log step.
    show_progress = is_main and config.get('progress', True)
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc='train',
        unit='step',
        dynamic_ncols=True,
        disable=not (show_progress and interactive()),
    )
    try:
        while step < total_steps:
            if step == config.get('simulate_preemption_at_step', -1) and step > start_step:
                os.kill(
                    os.getpid(), signal.SIGTERM
                )  # Tests: as if the scheduler preempted us here.
            # All processes must stop at the same step: with several, they agree at log steps.
            check_stop = jax.process_count() == 1 or step % log_every == 0
            if check_stop and sharding.any_process(bool(stop)):
                break
            phase = [p for p in phases if p.start_step <= step][-1]
            if len(phases) > 1 and (step == phase.start_step or step == start_step):
                log(
                    f'progressive stage {phases.index(phase) + 1}/{len(phases)} from step {step}: '
                    f'{phase.image_size}px'
                    + ('' if phase.drop_rate is None else f', dropout {phase.drop_rate:.3g}')
                    + ('' if phase.mixup is None else f', mixup {phase.mixup:.3g}')
                )
            batch = train_batch(config, step, steps_per_epoch, num_train, mesh, host_iter)
            state, m = phase_train_step(phase)(state, train_arrays, batch)
            step += 1
            pending.append((step, m))
            bar.update(1)

            due_ckpt = (ckpt_every > 0 and step % ckpt_every == 0) or step == total_steps
            due_eval = step % eval_every == 0 or step == total_steps
            if step % log_every == 0 or due_ckpt or due_eval:
                m = fetch_metrics()
                bar.set_postfix(
                    loss=f'{m["loss"]:.4f}',
                    acc=f'{m["accuracy"]:.3f}',
                    img_s=f'{m["img_per_sec"]:.0f}',
                )
                if show_progress and bar.disable:
                    log(
                        f'step {step}/{total_steps} (epoch {step / steps_per_epoch:.2f}): loss '
                        f'{m["loss"]:.4f}, accuracy {m["accuracy"]:.3f}, {m["img_per_sec"]:.0f} img/s, '
                        f'{m["eta_min"]:.1f} min left'
                    )
            if due_eval:
                eval_results = run_eval(step)
                log(
                    f'step {step}: '
                    + ', '.join(f'test {k} {v:.4f}' for k, v in eval_results.items())
                )
                if plateau and 'loss' in eval_results:
                    state = state.replace(
                        opt_state=plateau_update(state.opt_state, eval_results['loss'])
                    )
            if due_ckpt:
                ckpt.save(step, state)
                ckpt_lib.record_train_seconds(
                    workdir, step, seconds_before + time.time() - t0, is_main
                )
                writer.flush()

        if step < total_steps:  # Stopped by a signal (every process stops at this step).
            interrupted = sharding.any_process(stop.received == 'SIGINT')
            fetch_metrics()
            ckpt.save(step, state)
            ckpt.wait()
            ckpt_lib.record_train_seconds(workdir, step, seconds_before + time.time() - t0, is_main)
            writer.flush()
            bar.close()
            log(
                f'Received {stop.received or "a stop request"}: saved a checkpoint at step {step} in '
                f'{ckpt.directory}; exiting. Run the same command again to resume.'
            )
            return 130 if interrupted else 0

        # == Final report ==========================================================================
        bar.close()
        if not eval_results:  # Resumed a finished run: the loop did not evaluate.
            eval_results = run_eval(step)
        if is_main:
            summary = {
                'step': step,
                'model': model_name,
                'train_seconds': seconds_before + time.time() - t0,
                **{f'test_{k}': v for k, v in eval_results.items()},
            }
            with open(os.path.join(workdir, 'results.json'), 'w') as f:
                json.dump(summary, f, indent=2)
        writer.flush()
        plots = writer.plot(steps_per_epoch, float(config.get('label_smoothing', 0.0)))
        if 'accuracy' in eval_results:
            log(
                f'Final test accuracy: {eval_results["accuracy"] * 100:.2f}%'
                + (
                    f' (EMA {eval_results["ema_accuracy"] * 100:.2f}%)'
                    if 'ema_accuracy' in eval_results
                    else ''
                )
                + (f', mIoU {eval_results["miou"]:.3f}' if 'miou' in eval_results else '')
                + f' after {step} steps; plots: {", ".join(os.path.basename(p) for p in plots)}.'
            )
    except TrainingError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 1
    finally:
        bar.close()
        stop.restore()
        ckpt.close()  # Waits for pending saves: what was written stays written.
        writer.close()
    return 0


def cli() -> None:
    config_lib.run_cli(main)


if __name__ == '__main__':
    cli()
