"""Part `generator` (needs a StyleGAN2-ADA checkout): the whole generator, RTM mapper against MLP mapper,
at the cifar and paper512 configurations of train.py:

  forward        App. H protocol: no gradient, a batch of z, time divided by the batch size;
  training step  one generator step of the official loop: the StyleGAN2Loss 'Gmain' phase through the
                 discriminator, then Adam.

RTM is also measured captured (torch.compile) unless --compile-mode is none. The overheads are medians of
paired ratios (probes.paired_overhead), so load that drifts over the run cancels.
"""

import copy
from typing import Callable, List

import torch

from rtm_mapping import core
from rtm_mapping.bench import mappers, probes
from rtm_mapping.bench.settings import Settings
from rtm_mapping.bench.targets import Limit

TITLE = 'whole generator, forward and training step'
NEEDS_CHECKOUT = True

# Unconditional generator configurations of the official train.py (cfg_specs).
# On CUDA, mixed precision as train.py (num_fp16_res=4, conv_clamp=256); on CPU, float32.
CONFIGS = {
    'cifar':    dict(resolution=32,  channel_base=32768, channel_max=512, map=2, batch=64, mbstd=32,
                     architecture='orig',   style_mixing_prob=0.0, lrate=0.0025),
    'paper512': dict(resolution=512, channel_base=32768, channel_max=512, map=8, batch=8,  mbstd=8,
                     architecture='resnet', style_mixing_prob=0.9, lrate=0.0025),
}

# cifar, batch 64: t_RTM / t_MLP - 1, by device (the paper: +4.7% time per image on an H100).
TARGETS = {
    'forward_overhead':     {'cpu': Limit(0.01, 'overhead'), 'cuda': Limit(0.05, 'overhead')},
    'train_step_overhead':  {'cuda': Limit(0.05, 'overhead')},
}


def measure(run: Settings) -> dict:
    results = {}
    for name in run.configs:
        channel_div = run.channel_div * ((run.paper512_channel_div or 1) if name == 'paper512' else 1)
        results[name] = bench_generator(name, run.device, channel_div, run.gen_batch_div, run.gen_repeats, run.gen_warmup,
                                        steps=run.map_h, compile_mode=run.compile_mode)
    return results


def settings(name: str, device: torch.device, channel_div: int, batch_div: int) -> dict:
    spec = dict(CONFIGS[name])
    spec['channel_base'] //= channel_div
    spec['channel_max'] = max(1, spec['channel_max'] // channel_div)
    spec['batch'] = max(2, spec['batch'] // batch_div)
    spec['mbstd'] = min(spec['mbstd'], spec['batch'])
    spec['channel_div'] = channel_div
    spec['shrunk'] = channel_div != 1 or batch_div != 1
    spec['num_fp16_res'] = 4 if device.type == 'cuda' else 0
    spec['conv_clamp'] = 256 if device.type == 'cuda' else None
    return spec


def bench_generator(name: str, device: torch.device, channel_div: int, batch_div: int, repeats: int, warmup: int,
                    steps: int = core.DEFAULTS['steps'], compile_mode: str = 'none') -> dict:
    """Whole-generator forward and one generator training step, RTM (core.DEFAULTS but H = steps)
    against MLP, and RTM captured (set_compile(compile_mode)) unless compile_mode is 'none'."""
    import dnnlib

    spec = settings(name, device, channel_div, batch_div)
    image = dict(c_dim=0, img_resolution=spec['resolution'], img_channels=3)
    common = dict(z_dim=mappers.Z_DIM, w_dim=mappers.W_DIM, **image)
    synthesis_kwargs = dict(channel_base=spec['channel_base'], channel_max=spec['channel_max'],
                            num_fp16_res=spec['num_fp16_res'], conv_clamp=spec['conv_clamp'])
    generators = {
        'MLP': dnnlib.util.construct_class_by_name(class_name='training.networks.Generator', **common,
                                                   mapping_kwargs=dict(num_layers=spec['map']), synthesis_kwargs=synthesis_kwargs),
        'RTM': dnnlib.util.construct_class_by_name(class_name='rtm_mapping.networks.Generator', **common,
                                                   mapping_kwargs=dict(steps=steps), synthesis_kwargs=synthesis_kwargs),
    }
    generators['RTM'].synthesis.load_state_dict(generators['MLP'].synthesis.state_dict())
    if compile_mode != 'none':
        generators['RTM captured'] = copy.deepcopy(generators['RTM'])
        generators['RTM captured'].mapping.rtm.set_compile(compile_mode)
    D = dnnlib.util.construct_class_by_name(class_name='training.networks.Discriminator', **image, architecture=spec['architecture'],
                                            epilogue_kwargs=dict(mbstd_group_size=spec['mbstd']), **synthesis_kwargs)
    D.to(device).requires_grad_(False)
    z = torch.randn([spec['batch'], mappers.Z_DIM], device=device)
    c = torch.zeros([spec['batch'], 0], device=device)

    graphs_before = probes.compiled_graphs() if compile_mode != 'none' else 0
    for G in generators.values():
        G.to(device).eval().requires_grad_(False)
    forward_times = probes.time_interleaved({arm: _forward(G, z, c) for arm, G in generators.items()}, repeats, warmup, device)
    for G in generators.values():
        G.train().requires_grad_(True)
    step_times = probes.time_interleaved({arm: _training_step(G, D, z, c, spec, device) for arm, G in generators.items()}, repeats, warmup, device)
    forward_s, step_s = probes.medians(forward_times), probes.medians(step_times)
    rows = [dict(mapper                  = arm,
                 forward_ms_per_image    = forward_s[arm] * 1e3 / spec['batch'],
                 train_step_ms_per_image = step_s[arm] * 1e3 / spec['batch'],
                 mapper_params           = sum(p.numel() for p in G.mapping.parameters()),
                 mapper_flops_per_sample = probes.mapper_flops(G.mapping))
            for arm, G in generators.items()]
    result = dict(settings=dict(spec, steps=steps, compile_mode=compile_mode), rows=rows,
                  forward_overhead=probes.paired_overhead(forward_times, 'RTM', 'MLP'),
                  train_step_overhead=probes.paired_overhead(step_times, 'RTM', 'MLP'),
                  seconds=dict(forward=forward_times, train_step=step_times))
    if compile_mode != 'none':
        result.update(captured_forward_overhead=probes.paired_overhead(forward_times, 'RTM captured', 'MLP'),
                      captured_train_step_overhead=probes.paired_overhead(step_times, 'RTM captured', 'MLP'),
                      captured_graphs=probes.compiled_graphs() - graphs_before)
    return result


def _forward(G: torch.nn.Module, z: torch.Tensor, c: torch.Tensor) -> Callable[[], object]:
    """App. H: one forward of the whole generator, no gradient, constant noise (generate.py's default)."""
    def run():
        with torch.no_grad():
            return G(z, c, noise_mode='const')
    return run


def _training_step(G: torch.nn.Module, D: torch.nn.Module, z: torch.Tensor, c: torch.Tensor, spec: dict,
                   device: torch.device) -> Callable[[], object]:
    """One generator step of the official training loop: the StyleGAN2Loss 'Gmain' phase (G, then D,
    backward into G), then Adam with train.py's settings. Path-length regularization ('Greg',
    lazy, every 4th step in train.py) is left out."""
    from training.loss import StyleGAN2Loss

    loss = StyleGAN2Loss(device=device, G_mapping=G.mapping, G_synthesis=G.synthesis, D=D,
                         style_mixing_prob=spec['style_mixing_prob'], pl_weight=0)
    opt = torch.optim.Adam(G.parameters(), lr=spec['lrate'], betas=(0.0, 0.99), eps=1e-8)

    def run():
        opt.zero_grad(set_to_none=True)
        loss.accumulate_gradients(phase='Gmain', real_img=None, real_c=None, gen_z=z, gen_c=c, sync=True, gain=1)
        opt.step()
    return run


def targets(result: dict, run: Settings) -> List[dict]:
    cifar = result.get('cifar')
    if cifar is None:
        return []
    device = run.device.type
    at_settings = not cifar['settings']['shrunk'] and cifar['settings']['steps'] == core.DEFAULTS['steps']
    out = []
    for arm, prefix in [('RTM', ''), ('RTM captured', 'captured_')]:
        for measured, what in [('forward', 'forward'), ('train_step', 'training step')]:
            limit = TARGETS[f'{measured}_overhead'].get(device)
            value = cifar.get(f'{prefix}{measured}_overhead')
            if limit is not None and value is not None:
                out.append(limit.judge(f'generator {what} overhead, {arm}, cifar, batch {cifar["settings"]["batch"]}, {device}',
                                       value, at_settings=at_settings))
    return out


def markdown(result: dict, meta: dict) -> List[str]:
    out = ['Generator (official synthesis network), medians, ms per image:', '',
           '| config | batch | channel_base / max | mapper | forward | training step (G) |',
           '|---|---:|---:|---|---:|---:|']
    for name, g in result.items():
        s = g['settings']
        config = f'{name}{" (shrunk)" if s["shrunk"] else ""} | {s["batch"]} | {s["channel_base"]} / {s["channel_max"]}'
        for r in g['rows']:
            mapper = f'MLP {s["map"]} layers' if r['mapper'] == 'MLP' else f'{r["mapper"]} H={s["steps"]}'
            out.append(f'| {config} | {mapper} | {r["forward_ms_per_image"]:.3f} | {r["train_step_ms_per_image"]:.3f} |')
        out.append(f'| {name} | | | RTM overhead (median of paired ratios) | {g["forward_overhead"]:+.2%} | {g["train_step_overhead"]:+.2%} |')
        if 'captured_forward_overhead' in g:
            out.append(f'| {name} | | | RTM captured overhead ({g["captured_graphs"]} graphs compiled) | '
                       f'{g["captured_forward_overhead"]:+.2%} | {g["captured_train_step_overhead"]:+.2%} |')
    return out
