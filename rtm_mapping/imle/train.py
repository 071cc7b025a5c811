"""`rtm-mapping imle train`: an RS-IMLE generator with an RTM or MLP mapper (paper Tables 1, 2 and 5).

A config of training_configs/ (its settings under "imle", with "sources" saying where each value comes from)
fixes the recipe; the command line gives the data, the output folder and the run options, and can override any
setting (`--map=mlp`, `--map-h=4`, `--lr=1e-4`, ...). As in StyleGAN2-ADA's train.py, the options are printed
(`--dry-run`: printed only), written to RUN_DIR/training_options.json, and passed to
`training_loop.training_loop(**options)`; every snapshot records them too.

Several GPUs: `torchrun --nproc_per_node=N -m rtm_mapping.cli imle train ...` (one process per GPU; gloo on
the CPU, NCCL with CUDA).
"""

import copy
import json
import os
import re
import sys
from typing import Optional

import click
import torch

from rtm_mapping import configs, core, detectors
from rtm_mapping.imle import dataset, networks, sampler, snapshot, training_loop

#----------------------------------------------------------------------------
# The settings of an RS-IMLE run: the keys a config sets under "imle", each also a command-line option
# (map_h -> --map-h) that overrides it. name: (click type, help). Every config sets all of them but the
# mapper's own (RTM_KEYS or MLP_KEYS, unset = the mapper's defaults) and decoder_kwargs (the paper's decoders
# as they are); `rtm-mapping imle train --help` lists them.

class FloatPair(click.ParamType):
    """Two floats in [0, 1): Adam's betas, '0.5,0.999' on the command line, [0.5, 0.999] in a config."""
    name = 'beta1,beta2'

    def convert(self, value, param, ctx):
        parts = value.split(',') if isinstance(value, str) else value
        try:
            pair = [float(x) for x in parts if not isinstance(x, bool)]
        except (TypeError, ValueError):
            pair = []
        if len(pair) != 2 or len(parts) != 2 or not all(0 <= b < 1 for b in pair):
            self.fail(f'{value!r} is not two numbers in [0, 1) (e.g. 0.5,0.999)', param, ctx)
        return pair


class JSONDict(click.ParamType):
    """A dict: JSON on the command line ('{"width": 32}'), an object in a config."""
    name = 'json'

    def convert(self, value, param, ctx):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as err:
                self.fail(f'not JSON: {err}', param, ctx)
        if not isinstance(value, dict):
            self.fail(f'{value!r} is not a JSON object', param, ctx)
        return value


POSITIVE = click.FloatRange(min=0, min_open=True)
SETTINGS = {
    # Generator.
    'decoder':         (click.Choice(sorted(networks.DECODERS)), 'Decoder of App. C / Fig. 4'),
    'decoder_kwargs':  (JSONDict(),                  'Decoder architecture overrides (width, stages, ...), unset = as named'),
    'z_dim':           (click.IntRange(min=1),       'Width of the latent z'),
    'w_dim':           (click.IntRange(min=1),       'Width of the style w'),
    'map':             (click.Choice(networks.MAPPERS), 'Mapping network'),
    'map_h':           (click.IntRange(min=1),       'RTM refinement steps H'),
    'map_l':           (click.IntRange(min=1),       'RTM inner cycles L'),
    'map_block':       (click.Choice(core.BLOCKS),   'RTM shared block'),
    'map_tokens':      (click.IntRange(min=1),       'RTM tokens'),
    'map_token_dim':   (click.IntRange(min=1),       'RTM channels per token'),
    'map_depth':       (click.IntRange(min=1),       'MLP mapper layers'),
    # Optimisation and schedule.
    'epochs':          (click.IntRange(min=1),       'Training duration, in epochs (passes over the training set)'),
    'reselect':        (click.IntRange(min=1),       'Epochs between re-selections of the latents (one tick)'),
    'batch':           (click.IntRange(min=1),       'Total batch size'),
    'lr':              (POSITIVE,                    'Learning rate'),
    'betas':           (FloatPair(),                 'Adam betas'),
    'weight_decay':    (click.FloatRange(min=0),     'AdamW weight decay, 0 = Adam'),
    'lr_warmup':       (click.IntRange(min=0),       'Linear learning-rate warm-up, in optimizer steps'),
    'lr_decay_epochs': (click.IntRange(min=1),       'Epochs between learning-rate drops'),
    'lr_decay':        (click.FloatRange(min=0, max=1, min_open=True), 'Learning-rate factor of each drop'),
    'ema':             (click.FloatRange(min=0, max=1, max_open=True), 'Moving average of G, rate per step'),
    # Re-selection (rtm_mapping.imle.sampler).
    'force_factor':    (click.FloatRange(min=1),     'Pool size as a multiple of the number of images'),
    'epsilon':         (click.FloatRange(min=0),     'Rejection radius in the search space'),
    'knn_ignore':      (click.IntRange(min=1),       'Nearest pool samples of each image checked for rejection'),
    'jitter':          (click.FloatRange(min=0),     'Std of the Gaussian jitter of the selected latents'),
    'features':        (click.Choice(sampler.FEATURES), 'Search features'),
    # Loss (rtm_mapping.imle.loss).
    'lpips_weight':    (click.FloatRange(min=0),     'Weight of LPIPS-VGG'),
    'mse_weight':      (click.FloatRange(min=0),     'Weight of the pixel MSE'),
}
RTM_KEYS = {'map_h': 'steps', 'map_l': 'inner_steps', 'map_block': 'block', 'map_tokens': 'tokens', 'map_token_dim': 'token_dim'}
MLP_KEYS = {'map_depth': 'num_layers'}
OPTIONAL = set(RTM_KEYS) | set(MLP_KEYS) | {'decoder_kwargs'}

# --smoke: a tiny decoder (32 px, one block per stage, width 32), a handful of images, one tick.
SMOKE_SETTINGS = dict(decoder_kwargs=dict(width=32, stages=[[1, 1], [4, 1], [8, 1], [16, 1], [32, 1]]), epochs=10, reselect=10)
SMOKE_IMAGES = 8

# What may change when a run is resumed (setting or option -> the training option it sets); anything else
# must be what the snapshot's run had, so that the run continues as it was.
RESUMABLE = {'epochs': 'total_epochs', 'snap': 'snapshot_ticks', 'data': 'dataset_kwargs.path', 'batch_gpu': 'batch_gpu',
             'pool_batch': 'sampler_kwargs.batch_size'}


class EasyDict(dict):
    """A dict whose keys are also attributes (dnnlib.EasyDict's behaviour, for options objects)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def __setattr__(self, name, value):
        self[name] = value

#----------------------------------------------------------------------------

def _json_kind(kind: click.ParamType):
    """The JSON types a config value of a setting may have, and their name."""
    if isinstance(kind, click.types.IntParamType):
        return (int,), 'an integer'
    if isinstance(kind, click.types.FloatParamType):
        return (int, float), 'a number'
    return {FloatPair: ((list,), 'a list of two numbers'), JSONDict: ((dict,), 'a JSON object')}.get(type(kind), ((str,), 'a string'))


def validate_settings(settings: dict, where: str) -> dict:
    """Check a config's settings (types, ranges, choices, which keys); returns them with values normalised."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise click.ClickException(f'{where}: unknown setting(s) {", ".join(unknown)}; known: {", ".join(SETTINGS)}.')
    missing = [key for key in SETTINGS if key not in settings and key not in OPTIONAL]
    if missing:
        raise click.ClickException(f'{where}: missing setting(s) {", ".join(missing)}. An RS-IMLE config sets all of them: '
                                   'copy a built-in one (training_configs/*-imle-*.json) and edit it.')
    result = {}
    for key, value in settings.items():
        kind = SETTINGS[key][0]
        types, name = _json_kind(kind)
        if not isinstance(value, types) or isinstance(value, bool):
            raise click.ClickException(f'{where}: {key} must be {name}, got {value!r}.')
        try:
            result[key] = kind.convert(value, None, None)
        except click.BadParameter as err:
            raise click.ClickException(f'{where}: {key}: {err.message}') from err
    other = MLP_KEYS if result['map'] == 'rtm' else RTM_KEYS
    wrong = [key for key in other if key in result]
    if wrong:
        raise click.ClickException(f'{where}: {", ".join(wrong)} set, but map is {result["map"]!r}: those are settings of the other mapper.')
    return result


def apply_overrides(settings: dict, overrides: dict, log=print) -> dict:
    """Command-line values over a config's. --map to the other mapper drops the config's settings of the one it had."""
    settings = dict(settings)
    mapper = overrides.get('map') or settings['map']
    own, other = (RTM_KEYS, MLP_KEYS) if mapper == 'rtm' else (MLP_KEYS, RTM_KEYS)
    given = [f'--{key.replace("_", "-")}' for key in other if overrides.get(key) is not None]
    if given:
        raise click.UsageError(f'{", ".join(given)} {"is an option" if len(given) == 1 else "are options"} of the '
                               f'{"RTM" if mapper == "mlp" else "MLP"} mapper; this run has --map={mapper}.')
    dropped = [key for key in other if key in settings]
    if dropped and overrides.get('map') is not None:
        log(f'--map={mapper}: the config\'s {", ".join(dropped)} belong to the other mapper; left out.')
    for key in dropped:
        del settings[key]
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return settings


def mapper_description(G_kwargs: dict) -> str:
    """The mapper part of a run directory's name: rtmH8L2 (and -attention, -tok8x64 as the StyleGAN runs), mlp8."""
    kwargs = G_kwargs['mapper_kwargs'] or {}
    if G_kwargs['mapper'] != 'rtm':
        return f'mlp{kwargs.get("num_layers", networks.MLP_DEFAULTS["num_layers"])}'
    rtm = dict(core.DEFAULTS, **kwargs)
    desc = f'rtmH{rtm["steps"]}L{rtm["inner_steps"]}'
    if rtm['block'] != core.DEFAULTS['block']:
        desc += f'-{rtm["block"]}'
    if (rtm['tokens'], rtm['token_dim']) != (core.DEFAULTS['tokens'], core.DEFAULTS['token_dim']):
        desc += f'-tok{rtm["tokens"]}x{rtm["token_dim"]}'
    return desc


def training_options(settings: dict, *, data: str, snap: int, seed: int, batch_gpu: Optional[int], pool_batch: int,
                     subset: Optional[int]) -> EasyDict:
    """The keyword arguments of training_loop() for a run's settings and options (no run_dir yet)."""
    c = EasyDict()
    rtm = settings['map'] == 'rtm'
    c.G_kwargs = EasyDict(decoder=settings['decoder'], mapper=settings['map'], z_dim=settings['z_dim'], w_dim=settings['w_dim'],
                          mapper_kwargs={name: settings[key] for key, name in (RTM_KEYS if rtm else MLP_KEYS).items() if key in settings} or None,
                          decoder_kwargs=copy.deepcopy(settings.get('decoder_kwargs')))
    c.dataset_kwargs = EasyDict(path=os.path.abspath(os.path.expanduser(data)), max_images=subset)
    c.loss_kwargs = EasyDict(lpips_weight=settings['lpips_weight'], mse_weight=settings['mse_weight'])
    c.sampler_kwargs = EasyDict(force_factor=settings['force_factor'], epsilon=settings['epsilon'], knn_ignore=settings['knn_ignore'],
                                jitter_std=settings['jitter'], features=settings['features'], batch_size=pool_batch)
    c.optimizer_kwargs = EasyDict(lr=settings['lr'], betas=list(settings['betas']), weight_decay=settings['weight_decay'])
    c.lr_warmup_steps = settings['lr_warmup']
    c.lr_decay_epochs = settings['lr_decay_epochs']
    c.lr_decay = settings['lr_decay']
    c.ema_beta = settings['ema']
    c.batch_size = settings['batch']
    c.batch_gpu = batch_gpu
    c.total_epochs = settings['epochs']
    c.epochs_per_tick = settings['reselect']
    c.snapshot_ticks = c.image_snapshot_ticks = snap
    c.seed = seed
    c.resume = None
    return c


def _easydict(value):
    """A copy of nested dicts as EasyDicts."""
    if isinstance(value, dict):
        return EasyDict({key: _easydict(item) for key, item in value.items()})
    if isinstance(value, list):
        return [_easydict(item) for item in value]
    return value


def _get(options: dict, dotted: str):
    for part in dotted.split('.'):
        options = options[part]
    return options


def _set(options: dict, dotted: str, value) -> None:
    *parents, last = dotted.split('.')
    for part in parents:
        options = options[part]
    options[last] = value


def _differences(a, b, prefix=''):
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [key for name in sorted(set(a) | set(b)) for key in _differences(a.get(name), b.get(name), f'{prefix}{name}.')]
    return [] if a == b else [prefix[:-1]]


def _next_run_dir(outdir: str, desc: str) -> str:
    """OUTDIR/NNNNN-desc, numbered after the runs already there, as StyleGAN's train.py names them."""
    ids = [int(m.group()) for m in (re.match(r'^\d+', name) for name in (os.listdir(outdir) if os.path.isdir(outdir) else [])) if m]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def _init_distributed():
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns (rank, world_size)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size > 1 and not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
        torch.distributed.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo', init_method='env://')
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Tee:
    """Copy of everything printed, to RUN_DIR/log.txt (as dnnlib.util.Logger does for StyleGAN's runs), but
    the progress bars' redraws (text with a carriage return)."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.stream.write(text)
        if '\r' not in text:
            self.file.write(text)
            self.file.flush()

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)

#----------------------------------------------------------------------------

def _setting_options(fn):
    for key, (kind, text) in reversed(SETTINGS.items()):
        fn = click.option(f'--{key.replace("_", "-")}', key, type=kind, help=f'{text}  [default: the config\'s]',
                          metavar=None if isinstance(kind, click.Choice) else kind.name.upper())(fn)
    return fn


@click.command()
@click.pass_context
@click.option('--config', 'config_name', help='Config file, or the name of a built-in one (training_configs/*-imle-*)', metavar='PATH|NAME')
@click.option('--data', help='Training data: a folder of images or a dataset_tool.py zip', metavar='PATH')
@click.option('--outdir', help='Where to make the run directory', required=True, metavar='DIR')
@click.option('--resume', 'resume', help='Continue the run of a snapshot (snapshot-epoch-*.pt)', metavar='PT')
@click.option('--smoke', is_flag=True, help=f'A tiny run to check the pipeline: a 32 px decoder of width 32, {SMOKE_IMAGES} images, one tick, a snapshot.')
@click.option('--snap', help='Ticks between snapshots and sample grids', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--seed', help='Random seed', type=int, default=0, show_default=True)
@click.option('--subset', help='Train on the first N images only  [default: all]', type=click.IntRange(min=1))
@click.option('--batch-gpu', help='Images per forward pass on one GPU (gradient accumulation)  [default: batch / GPUs]', type=click.IntRange(min=1))
@click.option('--pool-batch', help='Batch size for decoding the pool and the sample grids', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('-n', '--dry-run', is_flag=True, help='Print the training options and exit.')
@_setting_options
def train(ctx, config_name, data, outdir, resume, smoke, snap, seed, subset, batch_gpu, pool_batch, dry_run, **overrides):
    """Train an RS-IMLE generator with an RTM (or MLP) mapper, from a config of training_configs/.

    \b
    Examples:
      # Table 5, RTM (H=8, L=2), on one few-shot set; the baseline is --config fewshot-imle-mlp
      rtm-mapping imle train --config fewshot-imle-rtm --data ~/datasets/obama.zip --outdir ~/imle-runs
    \b
      # A one-minute check of the whole pipeline on a laptop CPU
      rtm-mapping imle train --config fewshot-imle-rtm --data ~/datasets/obama.zip --outdir /tmp/runs --smoke
    \b
      # Table 1 on 4 GPUs
      torchrun --nproc_per_node=4 -m rtm_mapping.cli imle train --config cifar10-imle-rtm --data ~/datasets/cifar10.zip --outdir ~/imle-runs
    \b
      # Continue a run (train longer with --epochs)
      rtm-mapping imle train --resume ~/imle-runs/00000-fewshot-obama-rtmH8L2/snapshot-epoch-003000.pt --outdir ~/imle-runs
    """
    rank, world_size = _init_distributed()
    log = print if rank == 0 else (lambda *args, **kwargs: None)
    given = {key: value for key, value in overrides.items() if value is not None}
    run_options = dict(data=data, snap=snap, seed=seed, batch_gpu=batch_gpu, pool_batch=pool_batch, subset=subset)
    explicit = {key for key in run_options if ctx.get_parameter_source(key) == click.core.ParameterSource.COMMANDLINE}

    # Setup training options.
    previous = progress = None
    if resume is not None:
        state = snapshot.load(resume)
        previous, progress = state['options'], state['progress']
        del state   # the loop loads the weights itself
    if config_name is None and previous is None:
        raise click.UsageError('pass --config NAME (a built-in config or a file; see training_configs/), or --resume SNAPSHOT.')
    if config_name is not None:
        if data is None and previous is None:
            raise click.UsageError('pass --data: a folder of images or a dataset_tool.py zip.')
        config = configs.load_config(config_name, regime='imle')
        settings = validate_settings(config['imle'], config_name)
        if smoke:
            settings.update(SMOKE_SETTINGS)
            run_options['subset'] = subset or SMOKE_IMAGES
        settings = apply_overrides(settings, overrides, log)
        validate_settings(settings, 'the command line')
        if previous is not None and data is None:
            run_options['data'] = previous['dataset_kwargs']['path']
        c = training_options(settings, **run_options)
        desc = f'{settings["decoder"]}-{dataset.dataset_name(c.dataset_kwargs.path)}-{mapper_description(c.G_kwargs)}' + ('-smoke' if smoke else '')
        log(f'# {config["source"]}')
    else:
        if smoke:
            raise click.UsageError('--smoke starts a new run from --config; --resume alone continues the snapshot\'s run as it was.')
        fixed = sorted(f'--{key.replace("_", "-")}' for key in given if key not in RESUMABLE)
        fixed += sorted(f'--{key.replace("_", "-")}' for key in explicit if key not in RESUMABLE)
        if fixed:
            raise click.UsageError(f'{", ".join(fixed)}: the snapshot\'s run continues with its own settings; only '
                                   f'{", ".join("--" + key.replace("_", "-") for key in RESUMABLE)} can change on --resume.')
        c = _easydict(previous)
        for key, dotted in RESUMABLE.items():
            value = given.get(key, run_options.get(key) if key in explicit else None)
            if value is not None:
                _set(c, dotted, os.path.abspath(os.path.expanduser(value)) if key == 'data' else value)
                if key == 'snap':
                    c.image_snapshot_ticks = value
        desc = re.sub(r'^\d+-', '', os.path.basename(previous['run_dir']))
    if previous is not None:
        if 'vgg16' in previous['loss_kwargs'] and c.loss_kwargs.get('vgg16') is None:
            c.loss_kwargs.vgg16 = previous['loss_kwargs']['vgg16']     # the smoke's stand-in, in the first run's directory
        changed = [key for key in _differences(previous, c) if key not in ('run_dir', 'resume', 'device', 'progress', 'image_snapshot_ticks')
                   and key not in RESUMABLE.values()]
        if changed:
            raise click.ClickException('--resume continues the snapshot\'s run as it was, but these options differ from its: '
                                       + ', '.join(f'{key} ({_get(previous, key)!r} -> {_get(c, key)!r})' for key in changed)
                                       + '. Start a new run to change them.')
        if progress['epoch'] >= c.total_epochs:
            raise click.ClickException(f'{resume} is at epoch {progress["epoch"]} of {c.total_epochs}: nothing to do. '
                                       'Pass --epochs N to train on.')
        c.resume = os.path.abspath(resume)

    # Pick output directory.
    run_dir = [_next_run_dir(outdir, desc) if rank == 0 else None]
    if world_size > 1:
        torch.distributed.broadcast_object_list(run_dir, src=0)
    c.run_dir = run_dir[0]
    standin = smoke and c.loss_kwargs.get('vgg16') is None and not detectors.cached_files('vgg16')
    if standin:     # a pipeline check needs no 528 MB download: LPIPS through the test stand-in, said aloud
        c.loss_kwargs.vgg16 = os.path.join(c.run_dir, 'vgg16-standin.pt')

    # Print options.
    log()
    log('Training options:')
    log(json.dumps(c, indent=2))
    log()
    log(f'Output directory:   {c.run_dir}')
    log(f'Training data:      {c.dataset_kwargs.path}' + (f' (first {c.dataset_kwargs.max_images} images)' if c.dataset_kwargs.max_images else ''))
    log(f'Training duration:  {c.total_epochs} epochs, latents re-selected every {c.epochs_per_tick}')
    log(f'Generator:          {c.G_kwargs.decoder} decoder, {mapper_description(c.G_kwargs)} mapper')
    log(f'Processes:          {world_size}')
    if standin:
        log('LPIPS network:      a stand-in (NVIDIA\'s vgg16.pt is not installed: `rtm-mapping detectors install vgg16 FILE`); '
            'the smoke checks the pipeline, its losses mean nothing')
    log()
    if dry_run:
        log('Dry run; exiting.')
        return

    # Create output directory, then train.
    log('Creating output directory...')
    if rank == 0:
        os.makedirs(c.run_dir)
        with open(os.path.join(c.run_dir, 'training_options.json'), 'wt', encoding='utf-8') as f:
            json.dump(c, f, indent=2)
        if standin:
            detectors.standin('vgg16', c.loss_kwargs.vgg16)
    if world_size > 1:
        torch.distributed.barrier()
    stdout, stderr = sys.stdout, sys.stderr
    log_file = open(os.path.join(c.run_dir, 'log.txt'), 'at', encoding='utf-8') if rank == 0 else None
    try:
        if log_file is not None:
            sys.stdout, sys.stderr = _Tee(stdout, log_file), _Tee(stderr, log_file)
        training_loop.training_loop(**json.loads(json.dumps(c)))    # exactly what training_options.json says
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        if log_file is not None:
            log_file.close()

#----------------------------------------------------------------------------
