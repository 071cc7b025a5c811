"""The `rtm-mapping bench` command: set-up (settings, device, checkout), the parts asked for (parts.PARTS),
then the JSON and the markdown report."""

import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from typing import List, Optional

import click
import torch

from rtm_mapping import __version__, core
from rtm_mapping.bench import report
from rtm_mapping.bench.parts import PARTS, generator, mapper
from rtm_mapping.bench.settings import RUNS, settings
from stylegan2_ada_patch import checkout


def _full(key: str) -> str:
    return f'[default: {RUNS["full"][key]}; --quick: {RUNS["quick"][key]}]'


def command_line(params: dict) -> str:
    """The command that reproduces this run, every option spelled out."""
    args = ['rtm-mapping', 'bench']
    for name, value in params.items():
        flag = '--' + name.replace('_', '-')
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, (tuple, list)):
            args += [a for v in value for a in (flag, str(v))]
        else:
            args += [flag, str(value)]
    return ' '.join(shlex.quote(a) for a in args)


def find_checkout(stylegan: Optional[str], notes: List[str]) -> Optional[str]:
    """The StyleGAN2-ADA checkout of --stylegan, else checkout.find()'s (${STYLEGAN2_ADA_ROOT}, else the
    current folder), put on sys.path; None, with a note saying why, when --stylegan is not given and
    there is none."""
    try:
        root = checkout.find(stylegan)
        if checkout.codebase(root) != 'stylegan2-ada':   # before anything of it is imported
            raise click.ClickException(f'{root} is a StyleGAN3 checkout; the generator part and the official MLP baseline '
                                       'build StyleGAN2-ADA\'s networks: pass a StyleGAN2-ADA checkout, or none')
        return checkout.use(root)
    except click.ClickException as err:
        if stylegan is not None:
            raise
        notes.append(f'no StyleGAN2-ADA checkout ({err.format_message()}): the parts that need one are skipped, '
                     'the MLP baseline is rtm_mapping.mlp.ReferenceMLP. Pass --stylegan to use one.')
        click.echo(f'Note: {notes[-1]}', err=True)
        return None


def machine_info(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                rtm_mapping=__version__, cpu=_cpu_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                load_average=list(os.getloadavg()) if hasattr(os, 'getloadavg') else None)   # other jobs on the machine, at the start
    if device.type == 'cuda':
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


@click.command()
@click.pass_context
@click.option('--device',       type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True, help='Device to measure on.')
@checkout.option
@click.option('--part',         type=click.Choice(list(PARTS)), multiple=True, default=tuple(PARTS), show_default=True,
              help='Parts to run (repeatable); FLOPs always. Without a checkout, generator is skipped.')
@click.option('--config',       type=click.Choice(list(generator.CONFIGS)), multiple=True, default=tuple(generator.CONFIGS),
              show_default=True, help='Generator configurations of the generator part (repeatable).')
@click.option('--batch',        type=click.IntRange(min=1), default=None, help=f'Mapper batch of the mapper and memory parts  {_full("batch")}')
@click.option('--repeats',      type=click.IntRange(min=1), default=None, help=f'Timed repeats of each mapper  {_full("repeats")}')
@click.option('--warmup',       type=click.IntRange(min=0), default=None, help=f'Warm-up calls of each mapper  {_full("warmup")}')
@click.option('--gen-repeats',  type=click.IntRange(min=1), default=None, help=f'Timed repeats of each generator  {_full("gen_repeats")}')
@click.option('--gen-warmup',   type=click.IntRange(min=0), default=None, help=f'Warm-up calls of each generator  {_full("gen_warmup")}')
@click.option('--map-h',        type=click.IntRange(min=1), default=None, help=f'RTM steps H of the generator and dispatch parts  {_full("map_h")}')
@click.option('--compile-mode', type=click.Choice(('none',) + core.COMPILE_MODES), default='auto', show_default=True,
              help='torch.compile mode of the captured RTM in the generator and dispatch parts; auto = CUDA graphs on CUDA; none = eager only.')
@click.option('--paper512-channel-div', type=click.IntRange(min=1), default=None,
              help='Divide channel_base and channel_max of paper512 by this (recorded as shrunk)  [default: 1 = official]')
@click.option('--threads',      type=click.IntRange(min=1), default=None, help='torch CPU threads  [default: torch\'s choice]')
@click.option('--out',          type=click.Path(dir_okay=False), default='rtm-bench.json', show_default=True, help='JSON results file.')
@click.option('--quick',        is_flag=True, help='Tiny settings, a smoke test of the command (not a measurement).')
def bench(ctx, device, stylegan, part, config, batch, repeats, warmup, gen_repeats, gen_warmup, map_h, compile_mode, paper512_channel_div,
          threads, out, quick):
    """Benchmark RTM against the MLP mapper, side by side, and judge the speed and memory targets.

    Each time is a median over repeats after warm-up, with the mappers (or generators) timed
    alternately, A B then B A, so that machine noise hits both alike. The MLP baseline is the
    official MappingNetwork when a StyleGAN2-ADA checkout is found, else a pure-torch equivalent.

    \b
    Examples:
      rtm-mapping bench --stylegan ~/stylegan2-ada-pytorch --out bench.json
      rtm-mapping bench --device cuda --repeats 200 --warmup 20
      rtm-mapping bench --part dispatch --repeats 200
      rtm-mapping bench --quick --part mapper
    """
    # Set-up.
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device cuda: torch sees no CUDA device here; run with --device cpu or on a machine with a GPU.')
    if threads is not None:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    # Denormal floats take a slow microcode path on x86 CPUs, and how many the synthesis network meets
    # depends on the styles w: unflushed, two generators differing only in w differ in time by tens of
    # percent (cifar, batch 64: 30 s against 24 s for the same network). Flushed, the time is the compute.
    flush_denormal = dev.type == 'cpu' and torch.set_flush_denormal(True)
    if flush_denormal:
        ctx.call_on_close(lambda: torch.set_flush_denormal(False))
    notes = []
    root = find_checkout(stylegan, notes)
    run = settings(dev, official=root is not None, quick=quick, compile_mode=compile_mode, configs=config,
                   paper512_channel_div=paper512_channel_div, batch=batch, repeats=repeats, warmup=warmup,
                   gen_repeats=gen_repeats, gen_warmup=gen_warmup, map_h=map_h)
    results = dict(meta=dict(
        command  = command_line(dict(ctx.params, stylegan=root)),
        argv     = sys.argv,
        date     = datetime.now(timezone.utc).isoformat(timespec='seconds'),
        device   = device,
        quick    = quick,
        stylegan = root,
        flush_denormal = flush_denormal,
        machine  = machine_info(dev),
        settings = dict(run.to_json(), rtm=dict(core.DEFAULTS)),
    ))

    # Measurement: the parts asked for, in the order of PARTS.
    torch.manual_seed(0)
    targets = []
    for name, module in PARTS.items():
        if name not in part or (getattr(module, 'NEEDS_CHECKOUT', False) and not run.official):
            continue
        click.echo(f'{name}: {module.TITLE} ...', err=True)
        results[name] = module.measure(run)
        targets += module.targets(results[name], run)
    results['flops'] = mapper.flops(run.official)

    # Report.
    results['notes'] = notes
    results['targets'] = targets
    results['ratios'] = {t['name']: t['value'] for t in targets}
    click.echo(report.markdown(results))
    with open(out, 'w') as f:
        json.dump(results, f, indent=2)
    click.echo(f'\nWrote {out}', err=True)
