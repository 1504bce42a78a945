"""Benchmarks: `python -m jaxcnn.bench SUBCOMMAND ...` (one subparser per measurement).

train    images/s and ms/step of the trainer's own training step (jaxcnn.train.make_train_step:
         the batch gathered from device-resident data, forward, loss, backward, SGD update,
         metrics; state donated), warm-up excluded, device synchronised; compile time; FLOP/s achieved
         (XLA cost analysis) and its fraction of the device's peak (MFU); `--vs timm` runs the
         same model in PyTorch on the same device in the same process (on a GPU: bf16 autocast,
         channels_last, torch.compile; on a CPU: eager fp32, as torchvision users run it);
         `--rounds N` measures both N times in alternation and compares the best of each;
         `--parallel` builds several models in one process each, all at once, then times them
         one at a time:
           python -m jaxcnn.bench train --model resnet50 --batch 256 --size 224 --bf16 --vs timm
infer    the same for the forward pass in inference mode
compile  seconds to compile one training step (e.g. ResNet-152 against ResNet-50)
flops    FLOPs of one training step, counted without running it (for MFU of runs elsewhere)
latency  inference time per image for batch sizes 1, 2, 4, ..., 64 and a throughput plot:
           python -m jaxcnn.bench latency --models resnet18,resnet50 --plot latency.png
memory   peak memory of one compiled training step, from XLA's own memory analysis, and the
         time per step; e.g. reversible vs ordinary backprop:
           python -m jaxcnn.bench memory --models revnet38,revnet38:plain,resnet32 --batch 128

A model spec is NAME[:plain][:arg=value ...]; ':plain' sets ``reversible=False`` (ordinary
autodiff) on a reversible model, ':arg=value' any model argument (e.g. ``:scan_unroll=100``,
``:remat=True``). `--out FILE.json` writes a record (device, versions, kernel policy, settings,
figures). Every measurement runs under the backend's kernel policy (jaxcnn.kernels);
`--xla-options` sets the policy's XLA options, in every process `--parallel` starts.

Modules: common (specs, the trainer's step on generated data, timing, records), throughput
(train, infer, latency, the PyTorch twin, --parallel), flops (FLOP counts, device peaks),
memory (memory, compile).
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import optax

import jaxcnn
from jaxcnn.config import integer_at_least, integers_at_least

from .common import (
    Setup,
    bench_config,
    build,
    environment,
    split_specs,
    time_alternating,
    time_calls,
    write,
)
from .flops import PEAK_FLOPS, count_flops, peak_flops
from .memory import allocator_peak_bytes, cmd_compile, cmd_memory, measure_compile, measure_memory
from .throughput import (
    cmd_latency,
    cmd_throughput,
    infer_rounds,
    measure_infer,
    measure_latency,
    measure_train,
    policy,
    torch_reference,
    torch_rounds,
    train_rounds,
)


def cmd_flops(args):
    """FLOPs of one training step (and per image) from :func:`count_flops`, without running it."""
    import sys

    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    results = []
    for spec in split_specs(args.model):
        s = Setup(spec, args.batch, args.size, dtype, args.num_classes)
        flops = count_flops(s.step, s.args)
        results.append(
            dict(
                kind='flops',
                model=spec,
                batch=args.batch,
                size=args.size,
                dtype=jnp.dtype(dtype).name,
                flops_per_step=flops,
                flops_per_image=flops / args.batch,
            )
        )
        print(
            f'{spec:>24}  {flops / 1e9:12.1f} GFLOP per training step  '
            f'{flops / args.batch / 1e9:8.2f} GFLOP per image',
            flush=True,
        )
    write(
        args.out,
        {
            'command': ' '.join(['python -m jaxcnn.bench'] + sys.argv[1:]),
            **environment(),
            'results': results,
        },
    )
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m jaxcnn.bench',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest='command', required=True)
    positive = integer_at_least(1)
    mem = sub.add_parser('memory', help='peak memory (XLA memory analysis) of one training step')
    mem.add_argument(
        '--models', required=True, help='comma-separated NAME[:plain][:arg=value] specs'
    )
    mem.add_argument('--batch', type=positive, default=128)
    mem.add_argument('--size', type=positive, default=32, help='square input size')
    mem.add_argument('--num-classes', type=positive, default=10)
    mem.add_argument('--bf16', action='store_true', help='bf16 compute (fp32 parameters)')
    mem.add_argument(
        '--time-steps', type=integer_at_least(0), default=0, help='also time this many steps'
    )
    mem.add_argument('--out', default='', help='write the results as JSON here')
    mem.set_defaults(func=cmd_memory)

    for kind, helptext in [
        ('train', 'throughput of the full training step'),
        ('infer', 'throughput of inference'),
    ]:
        p = sub.add_parser(kind, help=helptext)
        p.add_argument(
            '--model', required=True, help='NAME[:plain][:arg=value], or several comma-separated'
        )
        p.add_argument('--batch', type=positive, default=64)
        p.add_argument('--size', type=positive, default=224)
        p.add_argument('--num-classes', type=positive, default=1000)
        p.add_argument('--bf16', action='store_true', help='bf16 compute (fp32 parameters)')
        p.add_argument(
            '--devices', type=positive, default=1, help='data-parallel over this many devices'
        )
        p.add_argument('--steps', type=positive, default=10, help='timed steps after warm-up')
        p.add_argument('--vs', choices=['timm'], default=None, help='also run the PyTorch twin')
        p.add_argument(
            '--rounds',
            type=positive,
            default=1,
            help='with --vs: measure both this many times in alternation and compare '
            'the best of each (for machines whose speed drifts)',
        )
        p.add_argument(
            '--xla-options',
            choices=['trainer', 'defaults', 'dense'],
            default='trainer',
            help="XLA compiler options: the trainer's for the model (default), XLA's "
            "defaults, or those for models without depthwise convolutions",
        )
        p.add_argument(
            '--parallel',
            action='store_true',
            help='several models: compile them in one process each, all at once, then '
            'time them one at a time (saves wall time on a many-core host)',
        )
        p.add_argument('--out', default='')
        p.set_defaults(func=cmd_throughput)
    for kind, helptext, func in [
        ('compile', 'compile time of one training step', cmd_compile),
        (
            'flops',
            "FLOPs of one training step (XLA's count, loops counted once per run), "
            'without running it',
            cmd_flops,
        ),
    ]:
        p = sub.add_parser(kind, help=helptext)
        p.add_argument('--model', required=True)
        p.add_argument('--batch', type=positive, default=64)
        p.add_argument('--size', type=positive, default=224)
        p.add_argument('--num-classes', type=positive, default=1000)
        p.add_argument('--bf16', action='store_true')
        p.add_argument('--out', default='')
        p.set_defaults(func=func)
    p = sub.add_parser('latency', help='inference ms per image over batch sizes')
    p.add_argument('--models', required=True)
    p.add_argument('--batch-sizes', type=integers_at_least(1), default='1,2,4,8,16,32,64')
    p.add_argument('--size', type=positive, default=224)
    p.add_argument('--bf16', action='store_true')
    p.add_argument('--steps', type=positive, default=5)
    p.add_argument('--plot', default='', help='write a throughput-vs-batch PNG here')
    p.add_argument('--out', default='')
    p.set_defaults(func=cmd_latency)
    args = parser.parse_args(argv)
    for spec in split_specs(getattr(args, 'model', None) or getattr(args, 'models', '')):
        jaxcnn.model_info(spec.partition(':')[0])  # unknown name: one clear line
    with policy(args):
        return args.func(args)
