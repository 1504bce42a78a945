"""The top classes of images under a pretrained model, prepared as its weights expect.

    python -m jaxcnn.predict --model resnet50 cat.jpg dog.png
    python -m jaxcnn.predict --model convnext_tiny --pretrained fb_in22k_ft_in1k photo.jpg
    python -m jaxcnn.predict --model resnet18 --pretrained path/to/model.safetensors photo.jpg

The weights come as ``jaxcnn.create_model(..., pretrained=...)`` takes them: timm's default tag
on the Hugging Face Hub, another tag, a hub id or a local file (with its ``config.json`` beside
it, where there is one). Each image goes through the weights' own evaluation transform
(:func:`jaxcnn.data.eval_transform`, as timm prepares it). Classes are named by the weights'
``label_names`` when ``config.json`` has them, else as ImageNet-1k's when the head has 1,000
outputs (WordNet synsets and their lemmas, in ``jaxcnn/data/imagenet1k_classes.tsv``), else
by their index.
"""

from __future__ import annotations

import argparse
import functools
import os

import numpy as np

from jaxcnn.config import integer_at_least

CLASSES_FILE = os.path.join(os.path.dirname(__file__), 'data', 'imagenet1k_classes.tsv')


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> dict:
    """{synset: lemmas} of ImageNet-1k's classes, in the classifiers' output order."""
    with open(CLASSES_FILE) as f:
        return dict(line.rstrip('\n').split('\t', 1) for line in f if line.strip())


def class_names(cfg: dict, num_classes: int) -> list:
    """A readable name for each output of a head with ``num_classes`` outputs."""
    labels = cfg.get('label_names')
    lemmas = imagenet_classes()
    if isinstance(labels, dict):  # id -> label, where the ids have gaps
        labels = [labels.get(str(i), labels.get(i, str(i))) for i in range(num_classes)]
    if labels and len(labels) == num_classes:
        return [lemmas.get(label, label) for label in labels]
    if num_classes == len(lemmas):
        return list(lemmas.values())
    return [f'class {i}' for i in range(num_classes)]


def read_images(paths, transform) -> np.ndarray:
    """The images at ``paths`` through ``transform``, stacked (N, H, W, C); one line naming
    the first file that is missing or is not an image."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'no image at {path!r}')
        try:
            with Image.open(path) as image:
                out.append(transform(image))
        except (UnidentifiedImageError, OSError):
            raise ValueError(
                f'cannot read {path!r} as an image: not a format Pillow reads'
            ) from None
    return np.stack(out)


def top_classes(model, variables, images, k: int):
    """(probabilities, class indices), each (N, k), of the ``k`` most probable classes."""
    import jax
    import jax.numpy as jnp

    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(images))
    probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
    order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
    return np.take_along_axis(probs, order, axis=-1), order


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m jaxcnn.predict',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files')
    parser.add_argument('--model', required=True, help='a registered model name')
    parser.add_argument(
        '--pretrained',
        default=None,
        help="a tag of the model's timm twin, a hub id or a weights file (default: timm's tag)",
    )
    parser.add_argument(
        '--top', type=integer_at_least(1), default=5, help='how many classes (default 5)'
    )
    args = parser.parse_args(argv)

    from jaxcnn import hub
    from jaxcnn.data import eval_transform

    hub.model_info(args.model)  # an unknown name is one line before any loading
    variables, cfg = hub.load_pretrained(
        True if args.pretrained is None else args.pretrained, args.model
    )
    model = hub.model_for_weights(args.model, variables, cfg['num_classes'])
    if not cfg['num_classes']:
        raise ValueError(f'the weights of {cfg["source"]} have no classifier to predict with')
    images = read_images(args.images, eval_transform(cfg))
    probs, order = top_classes(model, variables, images, min(args.top, cfg['num_classes']))
    names = class_names(cfg, cfg['num_classes'])
    for path, p, idx in zip(args.images, probs, order):
        print(path)
        for rank, (prob, i) in enumerate(zip(p, idx), 1):
            print(f'  {rank}. {100 * prob:6.2f}%  {names[i]}  [{i}]')
    return 0


if __name__ == '__main__':
    from jaxcnn.config import run_cli

    run_cli(main)
