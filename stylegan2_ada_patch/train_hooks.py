"""What a patched train.py calls, in StyleGAN2-ADA and StyleGAN3 (see stylegan2_ada_patch/patcher.py for the lines).

    setup()                       at import: today's-stack fixes (compat.py), extra metrics, --resume report.
    mapping_options               click options --map, --map-h, --map-l, ... and --smoke.
    setup_training_loop_kwargs()  StyleGAN2-ADA: wraps the official function and applies those options.
    apply_options()               StyleGAN3: applies those options to the config train.py built.

What differs between the two codebases is data (CODEBASE_OPTIONS here, rtm_mapping.adapters.RTM_GENERATORS);
both go through apply().
"""

import functools
import os
import sys

import click
import torch

from rtm_mapping import adapters, core, metrics
from stylegan2_ada_patch import checkout, compat

# codebase: options of ours (MAPPING_OPTIONS) that its train.py already has; there they keep their official meaning.
CODEBASE_OPTIONS = {
    'stylegan2-ada':    (),
    'stylegan3':        ('map_depth',),
}

#----------------------------------------------------------------------------
# setup()

def report_resume(copy_params_and_buffers):
    """Wrap misc.copy_params_and_buffers so that a partial copy (as --resume does) says what it skipped."""

    def copy(src_module, dst_module, require_all=False):
        copy_params_and_buffers(src_module, dst_module, require_all=require_all)
        if require_all:
            return
        from torch_utils import misc
        src = {name for name, _ in misc.named_params_and_buffers(src_module)}
        dst = {name for name, _ in misc.named_params_and_buffers(dst_module)}
        kind = type(dst_module).__name__
        if dst - src:
            print(f'rtm-mapping: --resume found no value for {len(dst - src)} tensors of {kind}; they keep their fresh initialisation: '
                  + ', '.join(sorted(dst - src)))
        if src - dst:
            print(f'rtm-mapping: --resume dropped {len(src - dst)} tensors of the pickle\'s {kind} that this {kind} does not have: '
                  + ', '.join(sorted(src - dst)))

    copy.rtm_mapping_wrapped = True
    return copy


def setup():
    """Called by the patched train.py and calc_metrics.py at import, in every process they spawn."""
    compat.apply()      # first: the fixes must be in place before NVIDIA's modules are imported
    from torch_utils import misc
    if not getattr(misc.copy_params_and_buffers, 'rtm_mapping_wrapped', False):
        misc.copy_params_and_buffers = report_resume(misc.copy_params_and_buffers)
    from training import training_loop
    if not getattr(training_loop.training_loop, 'rtm_mapping_wrapped', False):
        training_loop.training_loop = with_map_compile(training_loop.training_loop)
    metrics.register_metrics()


def with_map_compile(training_loop_fn):
    """training_loop() taking `map_compile` (--map-compile, kept in the training args, not in G_kwargs,
    hence never in a pickle) and applying it in the process that runs it: every RTM built there
    (G, G_ema, rebuilt copies) captures its recursion with torch.compile (core.set_compile_default)."""

    @functools.wraps(training_loop_fn)    # its signature stays the official one (compat.fix_adam_betas reads its defaults)
    def training_loop(map_compile=None, **kwargs):
        core.set_compile_default(map_compile)
        try:
            return training_loop_fn(**kwargs)
        finally:
            core.set_compile_default(None)

    training_loop.rtm_mapping_wrapped = True
    return training_loop

#----------------------------------------------------------------------------
# Options. The RTM's are rtm_mapping.adapters.TRAIN_OPTIONS, their defaults core.DEFAULTS; None means "not given".

_INT = dict(type=click.IntRange(min=1), metavar='INT')


def _rtm_option(argument: str):
    flag, what, choices = adapters.TRAIN_OPTIONS[argument]
    kind = _INT if choices is None else dict(type=click.Choice(list(choices)))
    return click.option(flag, help=f'{what} [default: {core.DEFAULTS[argument]}]', **kind)


# click's keyword name: the option, in the order of --help.
MAPPING_OPTIONS = {
    'map_kind':     click.option('--map', 'map_kind', help='Mapping network: mlp (official) or rtm [default: mlp]', type=click.Choice(['mlp', 'rtm'])),
    **{adapters.option_key(argument): _rtm_option(argument) for argument in adapters.TRAIN_OPTIONS},
    'map_depth':    click.option('--map-depth', help='Number of MLP mapping layers with --map=mlp [default: from --cfg]', **_INT),
    'map_compile':  click.option('--map-compile', help='Capture the RTM recursion with torch.compile; alone: auto = CUDA graphs on CUDA [default: off]',
                                 type=click.Choice(list(core.COMPILE_MODES)), is_flag=False, flag_value='auto', default=None, metavar='[MODE]'),
    'smoke':        click.option('--smoke', help='Smoke test: train this many images, snapshot, stop; on the CPU if there is no GPU [default: off]',
                                 type=click.IntRange(min=1), metavar='IMAGES'),
}


def _codebase_of(fn) -> str:
    """The codebase of the train.py that defines fn."""
    return checkout.codebase(os.path.dirname(os.path.abspath(sys.modules[fn.__module__].__file__)))


def mapping_options(fn):
    """Decorator adding the rtm-mapping options to train.py's main() (those its codebase does not have already)."""
    official = CODEBASE_OPTIONS[_codebase_of(fn)]
    for name, option in reversed(MAPPING_OPTIONS.items()):
        if name not in official:
            fn = option(fn)
    return fn


def apply_mapping_options(desc, G_kwargs, options, codebase='stylegan2-ada'):
    """Turn the --map options (a dict keyed like MAPPING_OPTIONS) into G_kwargs; returns the run description with their suffix."""
    rtm_given = {argument: options[adapters.option_key(argument)] for argument in adapters.TRAIN_OPTIONS
                 if options.get(adapters.option_key(argument)) is not None}
    map_depth = options.get('map_depth')
    if options.get('map_kind') != 'rtm':
        if rtm_given:
            raise click.UsageError(f'{", ".join(adapters.TRAIN_OPTIONS[argument][0] for argument in rtm_given)} need --map=rtm.')
        if map_depth is not None and 'map_depth' not in CODEBASE_OPTIONS[codebase]:
            G_kwargs.mapping_kwargs.num_layers = map_depth
            desc += f'-map{map_depth}'
        return desc

    if map_depth is not None:
        raise click.UsageError('--map-depth sets the depth of the MLP mapper; with --map=rtm, use --map-h and --map-l.')
    if G_kwargs.class_name not in adapters.RTM_GENERATORS:
        raise click.UsageError(f'--map=rtm replaces the mapper of the official generators ({", ".join(adapters.RTM_GENERATORS)}); '
                               f'this train.py builds {G_kwargs.class_name}.')
    kwargs = adapters.rtm_kwargs(**rtm_given)
    try:  # validate here, with the user's flag names, rather than in the training process
        core.RecursiveTokenMapper(G_kwargs.z_dim, G_kwargs.w_dim, **kwargs)
    except ValueError as err:
        raise click.UsageError(f'invalid RTM options: {err}') from err
    G_kwargs.class_name = adapters.RTM_GENERATORS[G_kwargs.class_name]
    G_kwargs.mapping_kwargs.pop('num_layers', None)
    G_kwargs.mapping_kwargs.update(kwargs)
    desc += f'-rtmH{kwargs["steps"]}L{kwargs["inner_steps"]}'
    if kwargs['block'] != core.DEFAULTS['block']:
        desc += f'-{kwargs["block"]}'
    if (kwargs['tokens'], kwargs['token_dim']) != (core.DEFAULTS['tokens'], core.DEFAULTS['token_dim']):
        desc += f'-tok{kwargs["tokens"]}x{kwargs["token_dim"]}'
    return desc


def apply_smoke(desc, args, images, metrics_given):
    """Run `images` images in one tick, write a snapshot and stop, with a 4x4 image grid and no metrics
    unless asked. Without CUDA, the official loop runs on the CPU (CUDA calls answered for the CPU
    inside training_loop, fp32): this checks the pipeline; it is not training."""
    from training import training_loop

    from stylegan2_ada_patch import cpu
    on_cpu = not torch.cuda.is_available()
    if on_cpu and args.num_gpus != 1:
        raise click.UsageError('--smoke without CUDA runs on the CPU in one process: use --gpus=1.')
    training_loop.setup_snapshot_image_grid = cpu.small_snapshot_grid(training_loop.setup_snapshot_image_grid)
    args.total_kimg = args.kimg_per_tick = images / 1000
    args.image_snapshot_ticks = args.network_snapshot_ticks = 1
    if not metrics_given:
        args.metrics = []
    if on_cpu:
        cpu.use_cpu(training_loop)
        synthesis_kwargs = args.G_kwargs.get('synthesis_kwargs', args.G_kwargs)   # StyleGAN3's are flat, as legacy.py reads them
        synthesis_kwargs.num_fp16_res = args.D_kwargs.num_fp16_res = 0
        synthesis_kwargs.conv_clamp = args.D_kwargs.conv_clamp = None
        args.data_loader_kwargs.pin_memory = False
    print(f'rtm-mapping: smoke mode: {images} images on the {"CPU (no CUDA), fp32" if on_cpu else "GPU"}, one tick, small snapshot grid'
          f'{"" if metrics_given else ", no metrics"}. This checks the pipeline; it is not training.')
    return desc + ('-cpusmoke' if on_cpu else '-smoke')


def _metrics_given() -> bool:
    """Whether the user passed --metrics to the running train.py."""
    ctx = click.get_current_context(silent=True)
    return ctx is not None and ctx.get_parameter_source('metrics') not in (None, click.core.ParameterSource.DEFAULT)


def apply(codebase, desc, args, **options):
    """The rtm-mapping options (keyword arguments named as in MAPPING_OPTIONS; those not given None) applied
    to the training config `args` of a codebase's train.py; returns the run description."""
    unknown = set(options) - set(MAPPING_OPTIONS)
    if unknown:
        raise TypeError(f'unknown rtm-mapping options: {", ".join(sorted(unknown))}')
    compat.fix_adam_betas(args)
    desc = apply_mapping_options(desc, args.G_kwargs, options, codebase=codebase)
    if options.get('map_compile') is not None:
        if options.get('map_kind') != 'rtm':
            raise click.UsageError('--map-compile captures the RTM recursion: it needs --map=rtm.')
        args.map_compile = options['map_compile']  # read by with_map_compile() in each training process, never part of G_kwargs
    if options.get('smoke') is not None:
        desc = apply_smoke(desc, args, options['smoke'], metrics_given=_metrics_given())
    return desc


def setup_training_loop_kwargs(official, **kwargs):
    """StyleGAN2-ADA's train.py: its setup_training_loop_kwargs() with its own options, then the rtm-mapping options on top."""
    ours = {name: kwargs.pop(name) for name in MAPPING_OPTIONS if name in kwargs}
    desc, args = official(**kwargs)
    return apply('stylegan2-ada', desc, args, **ours), args


def apply_options(c, desc, opts):
    """StyleGAN3's train.py: the rtm-mapping options among its command-line options `opts` applied to the config `c` it built."""
    return apply('stylegan3', desc, c, **{name: opts.get(name) for name in MAPPING_OPTIONS})

#----------------------------------------------------------------------------
