"""Config resolution for the command-line tools (`jaxcnn.train`, `jaxcnn.lr_find`).

`--config NAME[:arg]` loads `configs/NAME.py` and calls its `get_config(arg)`, as in
big_vision; `NAME` may also be a path to a `.py` file. `--config.a.b=value` overrides one
field, parsed to the type the field already has. `--workdir DIR` picks the run directory
(default `./workdirs/NAME`, so re-running the same command resumes the same run).

The file is read and the overrides set by `ml_collections.config_flags`, as in big_vision and
the Flax examples; what it cannot do is listed at `_read_through_config_flags`. Every mistake
(unknown config, unknown key, value of the wrong type) raises ValueError with one line naming
the closest valid choices.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import importlib.util
import math
import os
import re
import traceback
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections
from ml_collections import ConfigDict

from jaxcnn import optim

DEFAULT_CONFIG = 'default'
# configs/ next to the jaxcnn package (a source checkout), or installed inside it as
# jaxcnn/configs (a wheel, see pyproject.toml), for runs started outside the repository.
REPO_CONFIGS = Path(__file__).resolve().parent.parent / 'configs'
PACKAGED_CONFIGS = Path(__file__).resolve().parent / 'configs'


def config_dirs() -> list[Path]:
    """Directories searched for `NAME.py`: ./configs first, then the repository's or the
    installed package's."""
    dirs = []
    for d in (Path.cwd() / 'configs', REPO_CONFIGS, PACKAGED_CONFIGS):
        d = d.resolve()
        if d.is_dir() and d not in dirs:
            dirs.append(d)
    return dirs


def available_configs() -> list[str]:
    names = set()
    for d in config_dirs():
        names.update(p.stem for p in d.glob('*.py') if not p.stem.startswith('_'))
    return sorted(names)


def _closest(word: str, choices: Sequence[str], n: int = 3) -> str:
    """'did you mean: a, b' for the closest choices, or 'valid: ...' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.4)
    if not close:  # Substring matches, so that e.g. 'lr' finds 'optim.lr'.
        close = [c for c in choices if word.split('.')[-1] in c][:n]
    if close:
        return 'did you mean: ' + ', '.join(close)
    return 'valid: ' + ', '.join(sorted(choices)[:20]) + (', ...' if len(choices) > 20 else '')


def find_config_file(name: str) -> Path:
    """Resolves a bare config name or a path to a config file."""
    if name.endswith('.py') or os.sep in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f'Config file {name!r} does not exist; pass an existing .py file '
                f'or one of: {", ".join(available_configs())}.'
            )
        return path
    for d in config_dirs():
        if (d / f'{name}.py').is_file():
            return d / f'{name}.py'
    raise ValueError(
        f'Unknown config {name!r}; {_closest(name, available_configs())} '
        f'(searched {", ".join(str(d) for d in config_dirs())})'
    )


@contextlib.contextmanager
def _config_file_errors(path: Path):
    """An error in a config file's own code as one line naming the file and line. A ValueError
    of the config's (e.g. check_arg's) passes as it is."""
    try:
        yield
    except SyntaxError as e:
        raise ValueError(f'{path}:{e.lineno}: syntax error in the config file: {e.msg}') from None
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 (any error of the file's own code)
        line = next(
            (
                f.lineno
                for f in reversed(traceback.extract_tb(e.__traceback__))
                if f.filename == str(path)
            ),
            '?',
        )
        raise ValueError(
            f'{path}:{line}: the config file failed to load: {type(e).__name__}: {e}'
        ) from None


def load_config(spec: str | None) -> tuple[ml_collections.ConfigDict, str]:
    """Loads `NAME[:arg]` and returns (config, run_name), run_name being e.g. 'nfnet_f0_fmnist'."""
    spec = spec or DEFAULT_CONFIG
    name, _, arg = spec.partition(':')
    path = find_config_file(name)
    module_spec = importlib.util.spec_from_file_location(f'jaxcnn_configs_{path.stem}', path)
    module = importlib.util.module_from_spec(module_spec)
    with _config_file_errors(path):
        module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
        raise ValueError(
            f'Config file {path} has no get_config(arg=None) function; add one returning '
            f'an ml_collections.ConfigDict.'
        )
    with _config_file_errors(path):
        config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(
            f'{path}: get_config() returned {type(config).__name__}, expected an '
            f'ml_collections.ConfigDict.'
        )
    run_name = path.stem + (f'_{re.sub(r"[^A-Za-z0-9_.-]", "_", arg)}' if arg else '')
    return config, run_name


def flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
    keys = []
    for k, v in config.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(flat_keys(v, f'{prefix}{k}.'))
    return keys


def _parse_value(text: str, current: Any, key: str) -> Any:
    """Parses `text` to the type of the field's current value."""

    def bad(what):
        return ValueError(f'--config.{key}={text!r}: expected {what} (current value {current!r}).')

    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ('1', 'true', 'yes', 'on'):
            return True
        if low in ('0', 'false', 'no', 'off'):
            return False
        raise bad('true or false')
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            try:  # '1e3' is a fine way to write a step count, as long as it is whole.
                f = float(text)
            except ValueError:
                raise bad('an integer') from None
            if f != int(f):
                raise bad('an integer') from None
            return int(f)
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise bad('a number') from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(s.strip() for s in text.split(',') if s.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return type(current)(value)
    # None or another type: take a Python literal when it is one, else the string.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


FREE_FORM = ('model_kwargs', 'search')  # groups whose keys are not fixed by the schema


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets the dotted field `key` of `config` from the command-line string `text`."""
    parts = key.split('.')
    node = config
    if parts[0] in FREE_FORM and len(parts) == 2 and parts[0] in config:
        # Model constructor arguments differ per model: new keys are allowed here.
        if parts[1] not in config[parts[0]]:
            with config[parts[0]].unlocked():
                config[parts[0]][parts[1]] = _parse_value(text, None, key)
            return
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ValueError(f'Unknown config key {key!r}; {_closest(key, flat_keys(config))}.')
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError(
            f'--config.{key} is a group; set one of its fields, e.g. '
            f'--config.{key}.{next(iter(current.keys()), "x")}=...'
        )
    value = _parse_value(text, current, key)
    try:
        node[parts[-1]] = value
    except TypeError as e:
        raise ValueError(f'--config.{key}={text!r}: {e}') from None


def parse_args(
    argv: Sequence[str], tool: str = 'jaxcnn.train', extra_flags: dict[str, Any] | None = None
):
    """Parses `--config NAME[:arg] --config.k=v ... --workdir DIR [--flag value ...]`.

    Returns (config, run_name, workdir, extra) where `extra` holds the values of `extra_flags`
    (a dict of flag name -> default, typed by the default).
    """
    extra = dict(extra_flags or {})
    spec, workdir, overrides = None, None, []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ('-h', '--help'):
            print(
                f'usage: python -m {tool} [--config NAME[:arg] | path.py] '
                f'[--config.key=value ...] [--workdir DIR]'
                + ''.join(f' [--{k} {v!r}]' for k, v in extra.items())
                + f'\nconfigs: {", ".join(available_configs())}'
            )
            raise SystemExit(0)
        if not arg.startswith('--'):
            raise ValueError(
                f'Unexpected argument {arg!r}; flags look like --config NAME or --config.key=value.'
            )
        flag, eq, value = arg[2:].partition('=')
        if not eq:  # '--flag value' form.
            if i + 1 >= len(args):
                raise ValueError(f'--{flag} needs a value, e.g. --{flag}=VALUE.')
            value = args[i + 1]
            i += 1
        i += 1
        if flag == 'config':
            spec = value
        elif flag.startswith('config.'):
            overrides.append((flag[len('config.') :], value))
        elif flag == 'workdir':
            workdir = value
        elif flag in extra:
            extra[flag] = _parse_value(value, extra[flag], flag)
        else:
            known = ['config', 'config.KEY', 'workdir', *extra]
            raise ValueError(
                f'Unknown flag --{flag}; '
                f'{_closest(flag, known).replace(": ", ": --").replace(", ", ", --")}.'
            )
    config, run_name = load_config(spec)
    config = _read_through_config_flags(spec, config, overrides)
    workdir = workdir or os.path.join('workdirs', run_name)
    return config, run_name, workdir, extra


def _flat_values(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat_values(v, f'{prefix}{k}.'))
        else:
            out[prefix + k] = v
    return out


def _flag_text(value: Any) -> str:
    """The text that config_flags parses back to `value`."""
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return value if isinstance(value, str) else repr(value)


def _read_through_config_flags(
    spec: str | None, checked: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]]
) -> ml_collections.ConfigDict:
    """The config as `ml_collections.config_flags` reads it (`--config path.py:arg
    --config.k=v`), as big_vision and the Flax examples do.

    Each override is first applied to `checked`, the copy that load_config read, because that is
    where a mistake becomes one line naming the closest keys (config_flags raises absl errors
    without suggestions). config_flags cannot find a config by its bare name (resolved to a path
    here), read '1e3' as an integer (it gets the value's canonical text), set a field whose default
    is None, or add a key to the free-form groups (`model_kwargs`, `search`); those last two are set
    here, after config_flags has read everything else.
    """
    from absl import flags
    from ml_collections import config_flags

    defaults = _flat_values(checked)
    flag_args, set_here = [], []
    for key, text in overrides:
        apply_override(checked, key, text)  # raises the one-line errors
        if defaults.get(key) is None:
            set_here.append((key, text))
        else:
            flag_args.append(f'--config.{key}={_flag_text(_flat_values(checked)[key])}')
    name, _, arg = (spec or DEFAULT_CONFIG).partition(':')
    path = str(find_config_file(name).resolve()) + (f':{arg}' if arg else '')
    flag_values = flags.FlagValues()
    argv = ['jaxcnn', f'--config={path}', *flag_args]
    # sys_argv: config_flags defines a flag for each override that it sees there
    config_flags.DEFINE_config_file(
        'config', path, flag_values=flag_values, lock_config=False, sys_argv=argv
    )
    try:
        flag_values(argv)
    except flags.Error as e:  # not expected after the checks above; still one line
        raise ValueError(f'config_flags could not read {path}: {str(e).splitlines()[0]}') from None
    config = flag_values.config
    for key, text in set_here:
        apply_override(config, key, text)
    return config


def duration_steps(
    config: ml_collections.ConfigDict, prefix: str, steps_per_epoch: int, default: int = 0
) -> int:
    """Reads a duration given as `{prefix}_steps` or `{prefix}_epochs` (steps win when > 0).

    Epochs may be fractional; the result is rounded up to whole steps. Returns `default` when
    neither field is set to a positive value.
    """
    steps = config.get(f'{prefix}_steps', -1)
    if steps is not None and steps > 0:
        return int(steps)
    epochs = config.get(f'{prefix}_epochs', -1)
    if epochs is not None and epochs > 0:
        return max(1, math.ceil(epochs * steps_per_epoch))
    return default


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with neutral defaults; configs/*.py start from this.

    Fields follow the shared config schema; see configs/default.py for a complete recipe.
    """
    c = ConfigDict()
    c.model = 'resnet20'
    c.model_kwargs = ConfigDict()  # passed to jaxcnn.create_model (drop_path_rate, ...)
    c.model_fallback = ''  # stand-in when c.model is not registered (logged)
    c.dataset = 'fmnist'  # 'fmnist' | 'npz:PATH' | 'folder:PATH' | 'tfds:NAME'
    c.data_dir = ''  # '' -> $JAXCNN_FMNIST_DIR or /usr/share/datasets/fashion-mnist
    c.tfds_data_dir = ''
    c.test_fraction = 0.1  # folder datasets without a test split
    c.num_classes = None  # None: the dataset's number of classes
    c.image_size = 28  # train resolution
    c.test_image_size = 28  # eval resolution (crop size of the views)
    c.normalization = 'dataset'  # 'dataset' | 'model' (model_info mean/std)
    c.train_subset = 0  # > 0: train on the first N examples only
    c.test_subset = 0  # > 0: evaluate on the first N test examples only
    c.on_bad_image = 'skip'
    c.classes = ()  # keep only these labels, renumbered 0..k-1 in this order

    # Transfer learning (jaxcnn/transfer.py): start from pretrained weights with a new head.
    c.init_from = ''  # '.pth'/'.safetensors' (converted), 'hf:timm/...' or a jaxcnn workdir
    c.transfer = ConfigDict(
        dict(
            head_steps=0,  # > 0: first fit the head alone on cached features
            head_lr=0.05,
            freeze_backbone=False,  # main loop updates only params matching `trainable`
            trainable=r'^head/',
            freeze_bn=True,
        )
    )  # with a frozen backbone, BatchNorm runs in inference mode

    c.batch_size = 128  # global batch, split over all devices
    c.eval_batch_size = 1000
    c.num_epochs = 10.0  # duration: num_steps wins when > 0
    c.num_steps = -1
    c.seed = 0
    c.bf16 = False  # bf16 compute, float32 parameters
    c.label_smoothing = 0.0
    c.ema_decay = 0.0  # 0 = no weight EMA

    c.augment = ConfigDict(
        dict(
            crop_padding=4,
            flip=True,
            cutout=0,
            random_erasing=0.0,
            mixup=0.0,
            cutmix=0.0,
            randaugment_layers=0,
            randaugment_magnitude=0,
        )
    )
    c.eval = ConfigDict(dict(mode='center', scales=(1.0,)))
    # Progressive learning (Tan & Le 2021, §4.2, Algorithm 1): `stages` M > 1 splits training
    # into M equal parts; part i trains at S_i = S_0 + (S_e - S_0) i / (M - 1) pixels and with
    # each listed regulariser interpolated the same way. The end values are the recipe's own
    # (image_size, model_kwargs.drop_rate, augment.mixup); a start value < 0 leaves it fixed.
    c.progressive = ConfigDict(
        dict(stages=0, start_image_size=-1, start_drop_rate=-1.0, start_mixup=-1.0)
    )
    c.optim = ConfigDict(dict(optim.OPTIM_DEFAULTS))  # the defaults live in optim.py
    c.schedule = ConfigDict(dict(optim.SCHEDULE_DEFAULTS))

    # Durations: <name>_steps wins when > 0, else <name>_epochs (fractions allowed).
    c.log_every_steps = 50
    c.eval_every_steps = -1
    c.eval_every_epochs = 1.0
    c.checkpoint_every_steps = 500
    c.checkpoint_every_epochs = -1.0
    c.keep_checkpoints = 3
    c.progress = True  # tqdm progress bar

    c.search = ConfigDict()  # jaxcnn.search settings (configs/fbnet_search_fmnist.py)

    c.distributed = False  # call jax.distributed.initialize() (multi-host)
    c.coordinator_address = ''  # '' -> $JAXCNN_COORDINATOR or auto-detection
    c.num_processes = -1
    c.process_id = -1
    c.num_devices = -1  # -1: all devices; N: only the first N
    c.cpu_devices = 0  # CPU only: split the host into N devices (-1: per core)
    c.simulate_preemption_at_step = -1  # tests: send ourselves SIGTERM at this step
    return c


def shrink_for_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any config to seconds on a CPU (the 'smoke' / 'runlocal' argument).

    Fashion-MNIST subset, a narrow 3-block CIFAR ResNet, 8 steps, fp32; the rest of the
    recipe (optimiser, regularisers, EMA, augmentation) stays, so the path is still exercised.
    """
    c.model = 'resnet20'
    c.model_fallback = ''
    kept = {k: v for k, v in c.model_kwargs.items() if k in ('drop_rate', 'drop_path_rate')}
    c.model_kwargs = ConfigDict(dict(layers=(1, 1, 1), widths=(8, 16, 32), stem_width=8, **kept))
    c.dataset = 'fmnist'
    c.num_classes = None
    c.image_size = c.test_image_size = 28
    c.normalization = 'dataset'
    c.train_subset, c.test_subset = 512, 256
    c.batch_size, c.eval_batch_size = 32, 128
    c.num_steps = 8
    c.bf16 = False
    c.log_every_steps = 1
    c.eval_every_steps = 8
    c.checkpoint_every_steps = 4
    c.checkpoint_every_epochs = -1.0
    c.progress = False
    c.cpu_devices = 0
    c.optim.lr_scaling = 'none'
    c.optim.lr = min(c.optim.lr, 0.1)
    c.optim.grad_accum_steps = 1
    c.schedule.warmup_epochs = 0.0
    c.schedule.warmup_steps = min(c.schedule.warmup_steps, 2)
    c.augment.randaugment_layers = 0
    if c.eval.mode != 'center':
        c.eval.mode = 'center'
    return c


def zoo_fmnist_config(
    name: str,
    arg,
    model: str,
    *,
    model_kwargs: dict | None = None,
    smoke_model_kwargs: dict | None = None,
    image_size: int = 28,
    num_epochs: float = 10.0,
    batch_size: int = 128,
    optim: dict | None = None,
    smoke_lr: float | None = None,
) -> ml_collections.ConfigDict:
    """A Fashion-MNIST recipe for one model family of the zoo (``configs/<family>_fmnist.py``).

    ``image_size`` > 28 resizes the 28x28 images on the device (for nets whose stem needs more
    pixels). With ``arg`` 'smoke' the family's own model is kept, made small by
    ``smoke_model_kwargs``, and trained for 40 steps on 2,048 images: long enough for the
    training loss to fall visibly, short enough for CI.
    """
    check_arg(name, arg)
    c = base_config()
    c.model = model
    c.model_kwargs = ConfigDict(dict(model_kwargs or {}))
    c.dataset = 'fmnist'
    c.image_size = c.test_image_size = image_size
    c.batch_size = batch_size
    c.num_epochs = num_epochs
    c.optim.update(dict(name='sgd', lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4))
    c.optim.update(dict(optim or {}))
    c.schedule.update(dict(name='cosine', warmup_epochs=0.5))
    c.augment.update(dict(crop_padding=2 * image_size // 28, flip=True))
    c.label_smoothing = 0.1
    c.checkpoint_every_epochs = 1.0
    c.checkpoint_every_steps = -1
    if arg in ('smoke', 'runlocal'):
        lr = c.optim.lr if smoke_lr is None else smoke_lr
        shrink_for_smoke(c)
        c.model = model
        c.model_kwargs = ConfigDict({**(model_kwargs or {}), **(smoke_model_kwargs or {})})
        c.image_size = c.test_image_size = image_size
        c.train_subset, c.test_subset = 2048, 256
        c.num_steps = 40
        c.log_every_steps = 5
        c.eval_every_steps = 40
        c.checkpoint_every_steps = 40
        c.optim.lr = lr
    return c


def check_arg(name: str, arg, valid=('smoke', 'runlocal')) -> None:
    """Fails on an argument a config does not know."""
    if arg and arg not in valid:
        raise ValueError(
            f'Unknown argument {arg!r} for config {name!r}; use one of: '
            f'{", ".join(valid)} (or none).'
        )


def run_cli(main) -> None:
    """Entry point for a tool's ``main``: bad input becomes one 'error: ...' line and exit code 2."""
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before the training loop, which saves on Ctrl-C itself
        print('\ninterrupted before training started; nothing to save.', file=sys.stderr)
        sys.exit(130)


def integer_at_least(minimum: int):
    """An argparse ``type``: an integer no smaller than ``minimum``. argparse reports anything
    else in one line that names the option."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'must be at least {minimum}, got {value}')
        return value

    return parse


def integers_at_least(minimum: int):
    """An argparse ``type``: comma-separated integers, each no smaller than ``minimum``."""
    one = integer_at_least(minimum)

    def parse(text: str) -> list[int]:
        values = [one(part) for part in text.split(',') if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {text!r}')
        return values

    return parse
