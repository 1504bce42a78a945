"""Does a classifier's backbone help segmentation? ResNet-20 pre-trained on Fashion-MNIST
classification against the same U-Net trained from scratch, on configs/unet_fmnist.py's task
(every pixel labelled with its garment's class, or background).

Three trainer runs, each the command a user would type (written into the record):
  1. resnet20 classifying Fashion-MNIST (configs/resnet18_fmnist.py's recipe with model resnet20);
  2. unet_fmnist from scratch;
  3. unet_fmnist with --config.init_from set to run 1's workdir (encoder from the classifier,
     decoder and per-pixel head fresh); same steps, data order and seed as run 2.

    python benchmarks/segmentation_transfer.py --steps 300 --cls-steps 469 \
        --out benchmarks/results/unet_fmnist_pretrained_vs_scratch_cpu.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run(args, workdir):
    command = [sys.executable, '-m', 'jaxcnn.train', *args, '--workdir', workdir]
    start = time.time()
    subprocess.run(command, check=True)
    with open(os.path.join(workdir, 'results.json')) as f:
        result = json.load(f)
    result['wall_seconds'] = time.time() - start
    result['command'] = ' '.join(['python -m jaxcnn.train', *args, '--workdir', 'WORKDIR'])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=300, help='segmentation steps')
    parser.add_argument('--cls-steps', type=int, default=469, help='classifier steps (1 epoch)')
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix='seg_transfer_')
    cls_dir = os.path.join(root, 'classifier')
    # warm-up: 9 steps (the recipes' own are for their full schedules)
    short = ['--config.progress=false', '--config.schedule.warmup_epochs=0.02']
    common = [*short, f'--config.num_steps={args.steps}']
    classifier = run(
        [
            '--config=configs/resnet18_fmnist.py',
            '--config.model=resnet20',
            f'--config.num_steps={args.cls_steps}',
            *short,
        ],
        cls_dir,
    )
    scratch = run(['--config=configs/unet_fmnist.py', *common], os.path.join(root, 'scratch'))
    pretrained = run(
        ['--config=configs/unet_fmnist.py', *common, '--config.init_from=' + cls_dir],
        os.path.join(root, 'pretrained'),
    )
    record = dict(
        what='U-Net over ResNet-20 on Fashion-MNIST garment segmentation (11 classes), '
        'encoder pre-trained on Fashion-MNIST classification vs from scratch',
        classifier=classifier,
        scratch=scratch,
        pretrained=pretrained,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(record, f, indent=2)
    for k in ('scratch', 'pretrained'):
        r = record[k]
        print(f'{k}: test mIoU {r["test_miou"]:.3f}, pixel accuracy {r["test_accuracy"]:.3f}')


if __name__ == '__main__':
    main()
