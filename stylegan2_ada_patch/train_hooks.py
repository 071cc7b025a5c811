"""What a patched StyleGAN2-ADA train.py calls (see stylegan2_ada_patch/patcher.py for the lines).

    setup()                       at import: PyTorch 2.x fix, extra metrics, --resume report.
    mapping_options               click options --map, --map-h, --map-l, ... and --smoke.
    setup_training_loop_kwargs()  wraps the official function and applies those options.
"""

import multiprocessing

import click
import torch

from rtm_mapping import core, metrics

RTM_GENERATOR = 'rtm_mapping.networks.Generator'

#----------------------------------------------------------------------------
# setup()

class _SamplerDataSource(torch.utils.data.Sampler):
    """Accepts Sampler.__init__(data_source), which PyTorch 2.x removed and StyleGAN2-ADA still calls."""

    def __init__(self, data_source=None):
        del data_source
        super().__init__()


def fix_infinite_sampler():
    """Make torch_utils.misc.InfiniteSampler construct on PyTorch 2.x; returns True if a fix was needed.
    Its `super().__init__(dataset)` now resolves to _SamplerDataSource.__init__ (cooperative MRO)."""
    from torch_utils import misc
    try:
        misc.InfiniteSampler(range(1))
        return False
    except TypeError:
        misc.InfiniteSampler = type('InfiniteSampler', (misc.InfiniteSampler, _SamplerDataSource), {})
        return True


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
    from torch_utils import misc
    if fix_infinite_sampler() and multiprocessing.current_process().name == 'MainProcess':  # once, not in each worker
        print(f'rtm-mapping: PyTorch {torch.__version__} has no Sampler.__init__(data_source); '
              'gave torch_utils.misc.InfiniteSampler one for this run.')
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

    def training_loop(map_compile=None, **kwargs):
        core.set_compile_default(map_compile)
        try:
            return training_loop_fn(**kwargs)
        finally:
            core.set_compile_default(None)

    training_loop.rtm_mapping_wrapped = True
    return training_loop

#----------------------------------------------------------------------------
# Options. Defaults come from rtm_mapping.core.DEFAULTS; None means "not given".

MAPPING_OPTIONS = [
    click.option('--map', 'map_kind', help='Mapping network: mlp (official) or rtm [default: mlp]', type=click.Choice(['mlp', 'rtm'])),
    click.option('--map-h', help=f'RTM refinement steps H [default: {core.DEFAULTS["steps"]}]', type=click.IntRange(min=1), metavar='INT'),
    click.option('--map-l', help=f'RTM inner cycles L [default: {core.DEFAULTS["inner_steps"]}]', type=click.IntRange(min=1), metavar='INT'),
    click.option('--map-block', help=f'RTM shared block [default: {core.DEFAULTS["block"]}]', type=click.Choice(list(core.BLOCKS))),
    click.option('--map-tokens', help=f'RTM number of tokens [default: {core.DEFAULTS["tokens"]}]', type=click.IntRange(min=1), metavar='INT'),
    click.option('--map-token-dim', help=f'RTM channels per token [default: {core.DEFAULTS["token_dim"]}]', type=click.IntRange(min=1), metavar='INT'),
    click.option('--map-depth', help='Number of MLP mapping layers with --map=mlp [default: from --cfg]', type=click.IntRange(min=1), metavar='INT'),
    click.option('--map-compile', help='Capture the RTM recursion with torch.compile; alone: auto = CUDA graphs on CUDA [default: off]',
                 type=click.Choice(list(core.COMPILE_MODES)), is_flag=False, flag_value='auto', default=None, metavar='[MODE]'),
    click.option('--smoke', help='Smoke test: train this many images, snapshot, stop; on the CPU if there is no GPU [default: off]',
                 type=click.IntRange(min=1), metavar='IMAGES'),
]


def mapping_options(fn):
    """Decorator adding the rtm-mapping options to train.py's main()."""
    for option in reversed(MAPPING_OPTIONS):
        fn = option(fn)
    return fn


def apply_mapping_options(desc, args, map_kind=None, map_h=None, map_l=None, map_block=None, map_tokens=None, map_token_dim=None, map_depth=None):
    """Turn the --map options into G_kwargs; returns the run description with their suffix."""
    rtm_given = {name: value for name, value in [('--map-h', map_h), ('--map-l', map_l), ('--map-block', map_block),
                                                 ('--map-tokens', map_tokens), ('--map-token-dim', map_token_dim)] if value is not None}
    if map_kind != 'rtm':
        if rtm_given:
            raise click.UsageError(f'{", ".join(rtm_given)} need --map=rtm.')
        if map_depth is not None:
            args.G_kwargs.mapping_kwargs.num_layers = map_depth
            desc += f'-map{map_depth}'
        return desc

    if map_depth is not None:
        raise click.UsageError('--map-depth sets the depth of the MLP mapper; with --map=rtm, use --map-h and --map-l.')
    rtm_kwargs = dict(
        steps       = core.DEFAULTS['steps'] if map_h is None else map_h,
        inner_steps = core.DEFAULTS['inner_steps'] if map_l is None else map_l,
        block       = core.DEFAULTS['block'] if map_block is None else map_block,
        tokens      = core.DEFAULTS['tokens'] if map_tokens is None else map_tokens,
        token_dim   = core.DEFAULTS['token_dim'] if map_token_dim is None else map_token_dim,
    )
    try:  # validate here, with the user's flag names, rather than in the training process
        core.RecursiveTokenMapper(args.G_kwargs.z_dim, args.G_kwargs.w_dim, **rtm_kwargs)
    except ValueError as err:
        raise click.UsageError(f'invalid RTM options: {err}') from err
    args.G_kwargs.class_name = RTM_GENERATOR
    args.G_kwargs.mapping_kwargs.pop('num_layers', None)
    args.G_kwargs.mapping_kwargs.update(rtm_kwargs)
    desc += f'-rtmH{rtm_kwargs["steps"]}L{rtm_kwargs["inner_steps"]}'
    if rtm_kwargs['block'] != core.DEFAULTS['block']:
        desc += f'-{rtm_kwargs["block"]}'
    if (rtm_kwargs['tokens'], rtm_kwargs['token_dim']) != (core.DEFAULTS['tokens'], core.DEFAULTS['token_dim']):
        desc += f'-tok{rtm_kwargs["tokens"]}x{rtm_kwargs["token_dim"]}'
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
        args.G_kwargs.synthesis_kwargs.num_fp16_res = args.D_kwargs.num_fp16_res = 0
        args.G_kwargs.synthesis_kwargs.conv_clamp = args.D_kwargs.conv_clamp = None
        args.data_loader_kwargs.pin_memory = False
    print(f'rtm-mapping: smoke mode: {images} images on the {"CPU (no CUDA), fp32" if on_cpu else "GPU"}, one tick, small snapshot grid'
          f'{"" if metrics_given else ", no metrics"}. This checks the pipeline; it is not training.')
    return desc + ('-cpusmoke' if on_cpu else '-smoke')


def setup_training_loop_kwargs(official, map_kind=None, map_h=None, map_l=None, map_block=None, map_tokens=None,
                               map_token_dim=None, map_depth=None, map_compile=None, smoke=None, **config_kwargs):
    """train.py's setup_training_loop_kwargs(), then the rtm-mapping options on top."""
    desc, args = official(**config_kwargs)
    desc = apply_mapping_options(desc, args, map_kind=map_kind, map_h=map_h, map_l=map_l, map_block=map_block,
                                 map_tokens=map_tokens, map_token_dim=map_token_dim, map_depth=map_depth)
    if map_compile is not None:
        if map_kind != 'rtm':
            raise click.UsageError('--map-compile captures the RTM recursion: it needs --map=rtm.')
        args.map_compile = map_compile  # read by with_map_compile() in each training process
    if smoke is not None:
        desc = apply_smoke(desc, args, smoke, metrics_given=config_kwargs.get('metrics') is not None)
    return desc, args

#----------------------------------------------------------------------------
