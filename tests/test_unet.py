"""U-Net: the transposed convolution is the adjoint (VJP) of the strided convolution, equal to
PyTorch's conv_transpose2d; the layout's hand count, per-pixel logits and skip connections;
and a segmentation smoke run on real Fashion-MNIST images."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

import jaxcnn
from helpers import abstract_variables, random_variables
from jaxcnn.data.fmnist import fmnist_dir, read_idx
from jaxcnn.models.unet import WIDTHS_FIG1, WIDTHS_SMALL, up_conv

HIGHEST = jax.lax.Precision.HIGHEST


def conv(x, w, stride, padding='VALID'):
    """The forward (strided) convolution, NHWC with an HWIO kernel."""
    return jax.lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=HIGHEST,
    )


def conv_transpose(y, w, stride, kernel):
    """flax's transposed convolution (no bias) with the forward convolution's kernel w."""
    layer = nn.ConvTranspose(
        w.shape[2],
        (kernel, kernel),
        strides=(stride, stride),
        padding='VALID',
        transpose_kernel=True,
        use_bias=False,
        precision=HIGHEST,
    )
    return layer.apply({'params': {'kernel': w}}, y)


@pytest.mark.parametrize('kernel,stride,size', [(2, 2, 8), (3, 2, 9), (3, 1, 6), (4, 2, 10)])
def test_conv_transpose_is_the_vjp_of_the_strided_conv(kernel, stride, size):
    rng = np.random.RandomState(kernel * 10 + stride)
    c_x, c_y = 3, 5
    x = jnp.asarray(rng.randn(2, size, size, c_x), jnp.float32)
    w = jnp.asarray(rng.randn(kernel, kernel, c_x, c_y), jnp.float32)
    y_shape = conv(x, w, stride).shape
    y = jnp.asarray(rng.randn(*y_shape), jnp.float32)
    _, vjp = jax.vjp(lambda x: conv(x, w, stride), x)
    (expected,) = vjp(y)
    got = conv_transpose(y, w, stride, kernel)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # the adjoint's defining identity <conv(x), y> = <x, conv_transpose(y)>
    np.testing.assert_allclose(jnp.vdot(conv(x, w, stride), y), jnp.vdot(x, got), rtol=1e-5)


@pytest.mark.parametrize('kernel,stride,size', [(2, 2, 4), (3, 2, 4), (3, 1, 5)])
def test_conv_transpose_matches_pytorch(kernel, stride, size):
    """torch.nn.ConvTranspose2d weight (C_in, C_out, kh, kw) is the forward conv's OIHW kernel:
    the usual OIHW -> HWIO transpose gives the kernel flax stores with transpose_kernel=True."""
    rng = np.random.RandomState(size)
    c_in, c_out = 6, 4
    y = rng.randn(2, c_in, size, size).astype(np.float32)
    layer = torch.nn.ConvTranspose2d(c_in, c_out, kernel, stride)
    with torch.no_grad():
        layer.bias.normal_()
        expected = layer(torch.from_numpy(y)).numpy()
        functional = F.conv_transpose2d(
            torch.from_numpy(y), layer.weight, layer.bias, stride
        ).numpy()
    np.testing.assert_array_equal(expected, functional)
    params = {
        'kernel': jnp.asarray(layer.weight.detach().numpy().transpose(2, 3, 1, 0)),
        'bias': jnp.asarray(layer.bias.detach().numpy()),
    }
    ours = nn.ConvTranspose(
        c_out,
        (kernel, kernel),
        strides=(stride, stride),
        padding='VALID',
        transpose_kernel=True,
        precision=HIGHEST,
    )
    got = ours.apply({'params': params}, jnp.asarray(y.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(
        np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5
    )


def test_up_conv_doubles_the_map_and_stores_the_forward_kernel():
    layer = up_conv(4)
    y = jnp.ones((1, 3, 5, 6))
    params = layer.init(jax.random.key(0), y)['params']
    assert params['kernel'].shape == (2, 2, 4, 6)  # (kh, kw, out, in) = forward HWIO
    assert layer.apply({'params': params}, y).shape == (1, 6, 10, 4)
    # with kernel = stride = 2 the windows tile the output: each input pixel writes one 2x2 patch
    y = jnp.zeros((1, 3, 5, 6)).at[0, 1, 2].set(jax.random.normal(jax.random.key(1), (6,)))
    out = layer.apply({'params': params}, y) - params['bias']
    nz = np.argwhere(np.abs(np.asarray(out[0])).sum(-1) > 0)
    assert {tuple(p) for p in nz} <= {(2, 4), (2, 5), (3, 4), (3, 5)}


def unet_hand_count(widths, in_channels, num_classes):
    conv_params = lambda ci, co, k: k * k * ci * co + co
    total, c = 0, in_channels
    for w in widths:  # contracting path + bottom
        total += conv_params(c, w, 3) + conv_params(w, w, 3)
        c = w
    for w in reversed(widths[:-1]):  # 2x2 up-conv, concat, two 3x3 convs
        total += conv_params(c, w, 2) + conv_params(2 * w, w, 3) + conv_params(w, w, 3)
        c = w
    return total + conv_params(c, num_classes, 1)  # 1x1 classifier


def test_unet_small_hand_count_and_fig1():
    assert WIDTHS_SMALL == (8, 16, 32, 64, 128) and WIDTHS_FIG1 == (64, 128, 256, 512, 1024)
    info = jaxcnn.model_info('unet_small')
    assert info.family == 'unet' and info.input_size == (64, 64, 1) and info.num_classes == 2
    model = jaxcnn.create_model('unet_small')
    params = abstract_variables(model, (1, 64, 64, 1))['params']
    assert (
        jaxcnn.count_params(params) == unet_hand_count(WIDTHS_SMALL, 1, 2) == info.reference_params
    )
    assert params['up4']['kernel'].shape == (2, 2, 64, 128)
    assert params['dec4']['conv1']['kernel'].shape == (3, 3, 128, 64)  # skip (64) + up (64)
    assert params['head']['fc']['kernel'].shape == (8, 2)
    # the full-width Fig. 1 layout is the same code with 8x the widths
    full = jaxcnn.create_model('unet_small', widths=WIDTHS_FIG1)
    assert (
        jaxcnn.count_params(abstract_variables(full, (1, 64, 64, 1))['params'])
        == unet_hand_count(WIDTHS_FIG1, 1, 2)
        == 31_030_658
    )


def test_unet_per_pixel_logits_features_and_skips():
    model = jaxcnn.create_model('unet_small', num_classes=3)
    v = random_variables(model, (2, 32, 48, 1))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 32, 48, 1), jnp.float32)
    logits = model.apply(v, x)
    assert logits.shape == (2, 32, 48, 3)
    feats = jaxcnn.forward_features(model, v, x)
    assert feats.shape == (2, 32, 48, 8)
    fc = v['params']['head']['fc']
    np.testing.assert_allclose(logits, feats @ fc['kernel'] + fc['bias'], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        jaxcnn.create_model('unet_small', num_classes=0).apply(v, x), feats, rtol=1e-6, atol=1e-6
    )
    # the top skip connection carries full-resolution detail: a pixel's logits depend on an
    # input pixel 1 away even with every path through the bottom cut (bottom weights zeroed)
    p = dict(v['params'])
    p['bottom'] = jax.tree.map(jnp.zeros_like, p['bottom'])
    grad = jax.jit(jax.grad(lambda x: model.apply({'params': p}, x)[0, 10, 10].sum()))(x)
    assert np.abs(np.asarray(grad[0, 10, 11])).sum() > 0
    assert np.abs(np.asarray(grad[1])).sum() == 0  # samples stay independent


def test_unet_rejects_sizes_the_pools_cannot_halve():
    model = jaxcnn.create_model('unet_small')
    with pytest.raises(ValueError, match='divisible by 16, got 40x36'):
        model.init(jax.random.key(0), jnp.zeros((1, 40, 36, 1)))


FMNIST = fmnist_dir()


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
def test_unet_learns_to_segment_fashion_mnist_foreground():
    """Known answer: the mask of non-zero pixels of real Fashion-MNIST images (padded to 32x32).
    30 Adam steps must cut the per-pixel loss and beat predicting the majority class."""
    path = os.path.join(FMNIST, 'train-images-idx3-ubyte.gz')
    if not os.path.exists(path):
        path = path[:-3]
    images = read_idx(path)[: 1024 + 256]
    x = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None].astype(np.float32) / 255.0
    masks = (x[..., 0] > 0).astype(np.int32)
    x_train, m_train, x_test, m_test = x[:1024], masks[:1024], x[1024:], masks[1024:]

    model = jaxcnn.create_model('unet_small')
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))['params']
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    def loss_fn(params, x, m):
        logits = model.apply({'params': params}, (x - 0.5) / 0.5)
        return optax.softmax_cross_entropy_with_integer_labels(logits, m).mean()

    @jax.jit
    def step(params, opt_state, x, m):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, m)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    accuracy = jax.jit(
        lambda p, x, m: (model.apply({'params': p}, (x - 0.5) / 0.5).argmax(-1) == m).mean()
    )
    acc_before = float(accuracy(params, x_test, m_test))
    order = np.random.RandomState(0).permutation(1024)
    losses = []
    for i in range(30):
        idx = order[(i * 32) % 1024 : (i * 32) % 1024 + 32]
        params, opt_state, loss = step(params, opt_state, x_train[idx], m_train[idx])
        losses.append(float(loss))
    acc_after = float(accuracy(params, x_test, m_test))
    majority = max(m_test.mean(), 1 - m_test.mean())
    assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:3]), losses
    assert acc_after > max(acc_before, majority) + 0.1, (acc_before, acc_after, majority)
    assert acc_after > 0.9, acc_after


# ---------------------------------------------------------------------------------------------
# U-Net on any backbone (jaxcnn/models/segmentation.py)


def _flat(tree):
    return {
        tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.mark.parametrize(
    'backbone,size',
    [
        ('resnet18', 64),
        ('convnext_tiny', 64),
        ('vgg11', 32),
        ('inception_v3', 75),
        ('resnet20', 28),
    ],
)
def test_segmentation_model_on_any_backbone(backbone, size):
    """Per-pixel logits at the input's size whatever the backbone's finest level (VGG r1,
    ResNet r2, ConvNeXt r4) and however its strides round odd sides (Inception-v3 at 75 px);
    the encoder's variables are the headless classifier's, names and all."""
    from jaxcnn.models.segmentation import segmentation_model

    model = segmentation_model(backbone, num_classes=3)
    shape = (2, size, size, 3)
    variables = abstract_variables(model, shape)
    logits = jax.eval_shape(
        lambda v, x: model.apply(v, x), variables, jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    assert logits.shape == (2, size, size, 3)
    # every encoder variable is the headless classifier's (the layers after the coarsest level,
    # such as VGG's fc6/fc7 or ConvNeXt's head_norm, are not built), so its weights load
    classifier = _flat(abstract_variables(jaxcnn.create_model(backbone, 0), shape))
    encoder = {k: v for k, v in _flat(variables).items() if k[1] not in ('decoder', 'head')}
    assert encoder and all(classifier[k].shape == v.shape for k, v in encoder.items())
    # the decoder has one skip (and one 3x3 pair) per feature level
    levels = jaxcnn.feature_info(backbone, input_size=shape[1:])
    assert {f'dec{i}' for i in range(len(levels) - 1)} <= set(variables['params']['decoder'])


def test_dense_augmentation_moves_the_masks_with_their_images():
    from jaxcnn.data import augment_batch

    rng = np.random.RandomState(0)
    labels = rng.randint(0, 5, (8, 12, 12)).astype(np.int32)
    images = np.stack([labels.astype(np.float32), rng.randn(8, 12, 12)], -1)
    cfg = dict(crop_padding=3, flip=True)
    out, targets = augment_batch(
        jax.random.key(1), jnp.asarray(images), jnp.asarray(labels), cfg, 5
    )
    assert targets.shape == (8, 12, 12, 5)
    # channel 0 carried each pixel's label: it still does, wherever the crop kept image pixels
    # (the padding is 0 in both, and 0 is the background label)
    np.testing.assert_array_equal(np.asarray(out[..., 0]), np.asarray(targets.argmax(-1)))
    assert not np.array_equal(np.asarray(out[..., 0]), labels)  # something moved
    with pytest.raises(ValueError, match='cutmix=0'):
        augment_batch(
            jax.random.key(1), jnp.asarray(images), jnp.asarray(labels), dict(cutmix=1.0), 5
        )


def test_mean_iou_by_sets():
    from jaxcnn.train import mean_iou

    rng = np.random.RandomState(0)
    y, p = rng.randint(0, 4, 500), rng.randint(0, 3, 500)  # class 3 never predicted
    confusion = np.zeros((5, 5))
    np.add.at(confusion, (y, p), 1)
    # IoU of each class present in either, as |A & B| / |A | B| over the pixel sets
    ious = [((y == c) & (p == c)).sum() / ((y == c) | (p == c)).sum() for c in range(4)]
    assert mean_iou(confusion) == pytest.approx(np.mean(ious))


def test_classifier_weights_initialise_the_encoder():
    """What --config.init_from does with unet_fmnist's transfer.trainable: every encoder leaf
    comes from the classifier, the decoder and head keep their own initialisation."""
    from jaxcnn import transfer

    seg = jaxcnn.create_model('unet_resnet20', num_classes=11)
    cls = jaxcnn.create_model('resnet20')
    shape = (1, 28, 28, 1)
    target = random_variables(seg, shape, seed=0)
    source = random_variables(cls, shape, seed=1)
    merged = transfer.merge_pretrained(target, source, '^(decoder|head)/')
    flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])
    m, s, t = flat(merged), flat(source), flat(target)
    for path, leaf in m.items():
        new_part = path[1].key in ('decoder', 'head')
        np.testing.assert_array_equal(leaf, t[path] if new_part else s[path])


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f'Fashion-MNIST not found in {FMNIST}')
def test_unet_fmnist_trains_through_the_trainer(tmp_path):
    """The segmentation recipe's smoke run: the per-pixel loss falls, and the test mIoU beats
    the chance predictors (every pixel background; each pixel drawn from the label frequencies)
    by half again."""
    import json

    from jaxcnn import train
    from jaxcnn.data import garment_masks, load_fmnist

    assert train.main(['--config', 'unet_fmnist:smoke', '--workdir', str(tmp_path)]) == 0
    records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    losses = [r['loss'] for r in records if r['kind'] == 'train']
    assert np.mean(losses[-2:]) < 0.6 * losses[0], losses
    result = json.load(open(tmp_path / 'results.json'))
    y = garment_masks(load_fmnist()).test_labels[:256]
    freq = np.bincount(y.ravel(), minlength=11) / y.size
    all_background = freq[0] / 11  # the background's IoU is its frequency; the rest score 0
    # drawn at random with the frequencies: IoU_c = f^2 / (2f - f^2) = f / (2 - f)
    drawn = np.mean(freq / (2 - freq))
    assert result['test_miou'] > 1.5 * max(all_background, drawn), result
