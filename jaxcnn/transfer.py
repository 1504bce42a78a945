"""Transfer learning as the lectures teach it: reuse a trained backbone for a new task.

The recipe, each step a function here and a key of ``config.transfer`` in the trainer:
  1. load pretrained weights: converted PyTorch weights (``.pth``/``.pt``/``.safetensors``,
     through :func:`jaxcnn.convert.from_torch`), hub weights (``hf:timm/resnet50.a1_in1k``,
     through :mod:`jaxcnn.hub`) or a jaxcnn run directory (its newest checkpoint):
     :func:`load_pretrained`;
  2. replace the head for the new number of classes, keeping every other weight:
     :func:`merge_pretrained`;
  3. freeze the backbone: an optimiser that only updates the head
     (``optax.multi_transform`` over :func:`trainable_labels`), BatchNorm statistics frozen too
     by running the backbone in inference mode (switchable);
  4. compute the backbone's pooled features once, cache them, and train only the head on
     them (:func:`extract_features`, :func:`fit_head`): seconds instead of epochs;
  5. unfreeze and fine-tune everything at a tenth of the learning rate (the trainer's main
     loop with ``transfer.finetune_lr_factor``).
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxcnn import convert
from jaxcnn.optim import param_path

TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.safetensors')
HEAD = r'^head/'


def load_pretrained(path: str, model_name: str) -> dict:
    """Variables ``{'params', 'batch_stats'?}`` from a PyTorch file or a jaxcnn run directory.

    A run directory is a trainer ``--workdir`` (or its ``checkpoints/`` folder); its newest
    checkpoint's weights are used (the EMA weights when the run kept them).
    """
    if not path:
        raise ValueError(
            'transfer.init_from is empty; pass --config.transfer.init_from=PATH '
            '(a .pth/.safetensors file or a jaxcnn workdir).'
        )
    if path.startswith(('hf:', 'hf-hub:')):
        # hub weights, e.g. hf:timm/resnet50.a1_in1k (jaxcnn.hub: cached, converted, no torch)
        from jaxcnn import hub

        variables, _ = hub.load_pretrained(path, model_name)
        return jax.tree.map(np.asarray, variables)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f'pretrained weights not found: {path}; pass a .pth/.safetensors '
            'file or a jaxcnn workdir'
        )
    if os.path.isfile(path):
        if not path.endswith(TORCH_SUFFIXES):
            raise ValueError(
                f'{path}: unknown weight file type; use {", ".join(TORCH_SUFFIXES)} '
                'or a jaxcnn workdir'
            )
        return convert.from_torch(model_name, path)
    from jaxcnn import checkpoint as ckpt_lib

    directory = path
    if os.path.isdir(os.path.join(path, 'checkpoints')):
        directory = os.path.join(path, 'checkpoints')
    ckpt = ckpt_lib.Checkpointer(directory)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f'no checkpoint in {directory}; train there first or point '
                'transfer.init_from at a weight file'
            )
        saved = ckpt.restore_arrays()
    finally:
        ckpt.close()
    params = saved.get('ema_params') or saved['params']
    out = {'params': params}
    if saved.get('batch_stats'):
        out['batch_stats'] = saved['batch_stats']
    return jax.tree.map(np.asarray, out)


def merge_pretrained(target: dict, pretrained: dict, new_head: str = HEAD) -> dict:
    """``target``'s variables with every leaf taken from ``pretrained``, except those whose
    path matches ``new_head`` (the freshly initialised classifier for the new classes).

    Every non-head leaf must exist in ``pretrained`` with the same shape: a mismatch means the
    weights belong to another architecture and is reported by name.
    """
    rx = re.compile(new_head)
    out = {}
    for collection, tree in target.items():
        flat_t = traverse_util.flatten_dict(tree, sep='/')
        flat_p = traverse_util.flatten_dict(pretrained.get(collection, {}) or {}, sep='/')
        missing, wrong = [], []
        merged = {}
        for path, leaf in flat_t.items():
            if rx.search(path):
                merged[path] = leaf
            elif path not in flat_p:
                missing.append(path)
            elif tuple(np.shape(flat_p[path])) != tuple(leaf.shape):
                wrong.append(f'{path} {tuple(np.shape(flat_p[path]))} vs {tuple(leaf.shape)}')
            else:
                merged[path] = jnp.asarray(flat_p[path], leaf.dtype)
        if missing or wrong:
            raise ValueError(
                f'pretrained {collection} do not fit the model: missing {missing[:5]}, '
                f'shape mismatch {wrong[:5]}; was it trained with the same model and '
                'model_kwargs?'
            )
        out[collection] = traverse_util.unflatten_dict(merged, sep='/')
    return out


def trainable_labels(params, trainable: str = HEAD):
    """'train' for parameters whose path matches ``trainable``, 'freeze' for the rest."""
    rx = re.compile(trainable)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: 'train' if rx.search(param_path(p)) else 'freeze', params
    )


def freeze_backbone(tx: optax.GradientTransformation, trainable: str = HEAD):
    """``tx`` on the parameters matching ``trainable``; zero updates (and no optimiser state)
    for the rest."""
    return optax.multi_transform(
        {'train': tx, 'freeze': optax.set_to_zero()},
        lambda params: trainable_labels(params, trainable),
    )


def extract_features(model, variables, images, batch_size: int = 500, preprocess=None):
    """Pooled backbone features (the model built with ``num_classes=0``) in inference mode,
    computed batch by batch: the cache that head-only training reads."""

    @jax.jit
    def features(x):
        if preprocess is not None:
            x = preprocess(x)
        return model.apply(variables, x, train=False)

    out = [
        np.asarray(features(images[i : i + batch_size])) for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out).astype(np.float32)


def fit_head(
    features,
    labels,
    num_classes: int,
    *,
    steps: int = 500,
    lr: float = 0.05,
    batch_size: int = 256,
    weight_decay: float = 1e-4,
    seed: int = 0,
    label_smoothing: float = 0.0,
) -> dict:
    """Trains a linear classifier on cached features (SGD with momentum, cosine schedule).

    Returns ``{'fc': {'kernel', 'bias'}}``, the layout of every jaxcnn model's ``head``.
    """
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    n, dim = features.shape
    params = {'fc': {'kernel': jnp.zeros((dim, num_classes)), 'bias': jnp.zeros((num_classes,))}}
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9, nesterov=True),
    )

    def loss_fn(p, x, y):
        logits = x @ p['fc']['kernel'] + p['fc']['bias']
        return optax.softmax_cross_entropy(
            logits, optax.smooth_labels(jax.nn.one_hot(y, num_classes), label_smoothing)
        ).mean()

    @jax.jit
    def run(params, key):
        def step(carry, k):
            p, s = carry
            idx = jax.random.randint(k, (min(batch_size, n),), 0, n)
            g = jax.grad(loss_fn)(p, features[idx], labels[idx])
            updates, s = tx.update(g, s, p)
            return (optax.apply_updates(p, updates), s), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
        return params

    return run(params, jax.random.key(seed))


def head_accuracy(head: dict, features, labels) -> float:
    logits = np.asarray(features) @ np.asarray(head['fc']['kernel']) + np.asarray(
        head['fc']['bias']
    )
    return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


def set_head(params: dict, head: dict) -> dict:
    """``params`` with its ``head/fc`` replaced (other head entries, e.g. a pre-logits layer,
    are kept)."""
    return {**params, 'head': {**params['head'], 'fc': jax.tree.map(jnp.asarray, head['fc'])}}
