"""The RS-IMLE training loop (paper §3.1, eq. 1; Vashist et al. 2024), laid out as StyleGAN2-ADA's and EDM's are.

`training_loop(**options)` takes the options that `rtm-mapping imle train` writes to training_options.json.
One tick is one re-selection period:

    1. select: draw a pool of m latents, decode it with G, reject the pool samples within epsilon of a training
       image, pair every training image x_i with its nearest remaining sample z_sigma(i), jitter the latents
       (sampler.select_latents, which splits the pool across ranks);
    2. train: `epochs_per_tick` epochs over the pairs (x_i, z_sigma(i)) in shuffled minibatches: the loss
       (LPIPS-VGG + 0.1 MSE) of G(z_sigma(i)) against x_i, Adam(W), a moving average of G;
    3. report: a status line and a stats.jsonl line, and every `snapshot_ticks` / `image_snapshot_ticks` ticks
       (and at the end) a snapshot and a grid of samples.

Randomness: every draw comes from a torch.Generator of its own (`_generator`): 'select' (pool latents, jitter,
minibatch order; the same on every rank), 'noise' (the decoder's noise injection while training; one per rank),
'grid' (the fixed latents and noise of the image grids, so that grids are comparable and drawing them changes
nothing else). Snapshots hold the states of all of them and of torch's global generators, so that on the CPU a
run stopped and resumed ends with the same weights as one that ran straight through.

Several processes (torchrun): each rank holds the whole training set, draws the same minibatch order and trains
on its share of each minibatch; gradients are summed across ranks by one all-reduce per step, each rank's loss
scaled by 1 / (global batch size), so that the update does not depend on how a batch is split (an empty share
is allowed). Rank 0 writes stats, grids and snapshots.
"""

import copy
import hashlib
import json
import os
import time

import click
import numpy as np
import PIL.Image
import torch

from rtm_mapping.imle import dataset, loss, networks, sampler, snapshot

#----------------------------------------------------------------------------

def _generator(seed: int, stream: str, rank: int = 0, device='cpu') -> torch.Generator:
    """A torch.Generator for one named random stream of a run: independent of the others, the same on every
    start of the run (the seed is a hash of the run's seed, the stream's name and the rank)."""
    digest = hashlib.sha256(f'{seed}/{stream}/{rank}'.encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], 'little') >> 1)


def learning_rate(lr: float, step: int, epoch: int, warmup_steps: int, decay_epochs: int, decay: float) -> float:
    """RS-IMLE's schedule: linear warm-up over the first `warmup_steps` optimizer steps, then a factor `decay`
    every `decay_epochs` epochs. A function of the progress counters only: they are the scheduler's whole state."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return lr * warmup * decay ** (epoch // decay_epochs)


def grid_size(resolution: int):
    """Columns and rows of the sample grids: about 2048 pixels wide, 4 to 16 columns, half as many rows."""
    gw = int(np.clip(2048 // resolution, 4, 16))
    return gw, max(gw // 2, 2)


def save_image_grid(images: torch.Tensor, path: str, grid: tuple) -> None:
    """Write images [gw * gh, 3, R, R] (uint8, or float in [-1, 1]) as one PNG, row by row."""
    if images.dtype != torch.uint8:
        images = (images.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    gw, gh = grid
    _, c, h, w = images.shape
    array = images.cpu().reshape(gh, gw, c, h, w).permute(0, 3, 1, 4, 2).reshape(gh * h, gw * w, c)
    PIL.Image.fromarray(array.numpy(), 'RGB').save(path)


def _progress_bars(tick: int):
    """A progress callback for sampler.select_latents: one tqdm bar per stage ('decode', 'search')."""
    from tqdm import tqdm
    bars = {}

    def progress(stage, done, total):
        if stage not in bars:
            bars[stage] = tqdm(total=total, desc=f'tick {tick} {stage}', leave=False, unit='img' if stage == 'decode' else 'it', disable=None)
        bars[stage].update(done - bars[stage].n)
        if done >= total:
            bars.pop(stage).close()
    return progress


def _rank_and_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _rng_state(noise_rng: torch.Generator, device: torch.device) -> dict:
    return dict(torch=torch.get_rng_state(), noise=noise_rng.get_state(),
                cuda=torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)


def _set_rng_state(state: dict, noise_rng: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state['torch'])
    noise_rng.set_state(state['noise'])
    if device.type == 'cuda' and state['cuda'] is not None:
        torch.cuda.set_rng_state(state['cuda'], device)

#----------------------------------------------------------------------------

def training_loop(
    run_dir                 = '.',      # Output directory.
    dataset_kwargs          = None,     # Training images: dataset.load_images(path, max_images); the resolution is G's.
    G_kwargs                = None,     # Generator: networks.Generator(**G_kwargs).
    loss_kwargs             = None,     # Loss: loss.IMLELoss(**loss_kwargs).
    sampler_kwargs          = None,     # Re-selection: force_factor, epsilon, knn_ignore, jitter_std, features, batch_size.
    optimizer_kwargs        = None,     # torch.optim.AdamW: lr, betas, weight_decay (0 = Adam).
    lr_warmup_steps         = 0,        # Linear learning-rate warm-up, in optimizer steps.
    lr_decay_epochs         = 4000,     # Epochs between learning-rate drops.
    lr_decay                = 1.0,      # Factor of each drop.
    ema_beta                = 0.9999,   # Moving average of G, per optimizer step: G_ema = beta * G_ema + (1 - beta) * G.
    batch_size              = 4,        # Total batch size of one optimizer step, over all ranks.
    batch_gpu               = None,     # Images per forward pass on one rank (gradient accumulation), None = batch_size / ranks.
    total_epochs            = 10000,    # Training duration, in passes over the training set.
    epochs_per_tick         = 30,       # Re-selection period: the latents are drawn again at the start of every tick.
    snapshot_ticks          = 10,       # How often to save a snapshot, None = only at the end.
    image_snapshot_ticks    = 10,       # How often to save a grid of samples, None = only at the end.
    seed                    = 0,        # Seed of every random stream of the run.
    resume                  = None,     # Snapshot to continue from, None = start afresh.
    device                  = None,     # torch.device, None = cuda:LOCAL_RANK when CUDA is there, else the CPU.
    progress                = True,     # Progress bars on rank 0 (tqdm; none when stderr is not a terminal).
):
    # Initialize.
    options = json.loads(json.dumps(dict(locals(), device=None if device is None else str(device))))   # plain data, for snapshots
    start_time = time.time()
    rank, world_size = _rank_and_world()
    if device is None:
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))) if torch.cuda.is_available() else torch.device('cpu')
    device = torch.device(device)
    batch_gpu = batch_gpu or -(-batch_size // world_size)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True       # as StyleGAN2-ADA's and EDM's loops: a run has few distinct shapes
    log = print if rank == 0 else (lambda *args, **kwargs: None)
    bar = progress and rank == 0

    # Construct networks: the same initial weights on every rank.
    log('Constructing networks...')
    torch.manual_seed(seed)
    try:
        G = networks.Generator(**G_kwargs).train().requires_grad_(True).to(device)
    except (TypeError, ValueError) as err:
        raise click.ClickException(f'invalid generator options {G_kwargs}: {err}') from err
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    try:
        loss_fn = loss.IMLELoss(**loss_kwargs).to(device)
    except (FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    optimizer = torch.optim.AdamW(G.parameters(), **optimizer_kwargs)
    log(f'Generator: {G.init_kwargs["decoder"]} decoder, {G.init_kwargs["mapper"]} mapper, '
        f'{sum(p.numel() for p in G.parameters()):,} parameters ({sum(p.numel() for p in G.mapping.parameters()):,} in the mapper), '
        f'{G.img_resolution}x{G.img_resolution} images.')

    # Load training set.
    log('Loading training set...')
    images = dataset.load_images(dataset_kwargs['path'], G.img_resolution, max_images=dataset_kwargs.get('max_images'),
                                 log=log, progress=bar)
    num_images = len(images)
    log(f'Num images: {num_images}, shape {list(images.shape[1:])}')

    # Random streams.
    torch.manual_seed(int(_generator(seed, 'global', rank).initial_seed()))
    select_rng = _generator(seed, 'select')
    noise_rng = _generator(seed, 'noise', rank, device=device)
    latents = None      # the latent of each training image, from the last selection
    cur_tick = cur_epoch = cur_step = cur_nimg = 0

    # Resume from a snapshot.
    if resume is not None:
        log(f'Resuming from "{resume}"')
        data = snapshot.load(resume)
        if data['G_init_kwargs'] != G.init_kwargs:
            raise click.ClickException(f'{resume}: its generator ({data["G_init_kwargs"]}) is not the one these options build '
                                       f'({G.init_kwargs}).')
        G.load_state_dict(data['G'])
        G_ema.load_state_dict(data['G_ema'])
        optimizer.load_state_dict(data['optimizer'])
        latents = data['latents']
        cur_tick, cur_epoch, cur_step, cur_nimg = (data['progress'][key] for key in ('tick', 'epoch', 'step', 'nimg'))
        rng = data['rng']
        select_rng.set_state(rng['shared'])
        if rng['world_size'] == world_size:
            _set_rng_state(rng['ranks'][rank], noise_rng, device)
        else:
            log(f'The snapshot was written by {rng["world_size"]} processes, this run has {world_size}: the decoder noise '
                'streams start afresh, so the run continues, but not exactly as it would have.')
        del data
    if world_size > 1:
        for tensor in list(G.state_dict().values()) + list(G_ema.state_dict().values()):
            torch.distributed.broadcast(tensor, src=0)

    # Search features of the training images, fixed for the run.
    log('Computing search features of the training images...')
    features = sampler.build_features(sampler_kwargs['features'], img_resolution=G.img_resolution, loss=loss_fn,
                                      seed=_generator(seed, 'features').initial_seed())
    data_features = sampler.compute_features(features, images, batch_size=sampler_kwargs['batch_size'], device=device)
    pool_size = sampler.pool_size_for(num_images, sampler_kwargs['force_factor'])

    # Export sample images.
    grid = grid_size(G.img_resolution)
    grid_z = torch.randn([grid[0] * grid[1], G.z_dim], generator=_generator(seed, 'grid'))

    def render_grid(name):
        noise = _generator(seed, 'grid-noise', device=device)     # the same noise in every grid
        with torch.no_grad():
            fakes = torch.cat([G_ema(z.to(device), generator=noise).cpu() for z in grid_z.split(sampler_kwargs['batch_size'])])
        save_image_grid(fakes, os.path.join(run_dir, name), grid)

    if rank == 0:
        log('Exporting sample images...')
        order = torch.randperm(num_images, generator=_generator(seed, 'reals'))
        save_image_grid(images[order[torch.arange(grid[0] * grid[1]) % num_images]], os.path.join(run_dir, 'reals.png'), grid)
        render_grid('fakes-init.png' if resume is None else f'fakes-resume-epoch-{cur_epoch:06d}.png')
    stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at') if rank == 0 else None

    # Train.
    log(f'Training for {total_epochs} epochs, from epoch {cur_epoch}, re-selecting the latents every {epochs_per_tick} epochs...')
    log()
    params = list(G.parameters())
    while True:
        tick_start_time = time.time()
        tick_start_nimg = cur_nimg

        # 1. Select: pair every training image with a latent (§3.1 eq. (1), with RS-IMLE's rejection).
        latents, select_stats = sampler.select_latents(
            G, data_features, pool_size=pool_size, features=features, epsilon=sampler_kwargs['epsilon'],
            knn_ignore=sampler_kwargs['knn_ignore'], batch_size=sampler_kwargs['batch_size'], jitter_std=sampler_kwargs['jitter_std'],
            generator=select_rng, device=device, previous=latents, progress=_progress_bars(cur_tick + 1) if bar else None)
        select_sec = time.time() - tick_start_time

        # 2. Train: epochs over the pairs (x_i, z_sigma(i)).
        tick_epochs = min(epochs_per_tick, total_epochs - cur_epoch)
        steps = tick_epochs * -(-num_images // batch_size)
        loss_sum = torch.zeros([], dtype=torch.float64, device=device)
        pbar = None
        if bar:
            from tqdm import tqdm
            pbar = tqdm(total=steps, desc=f'tick {cur_tick + 1} train', unit='step', leave=False, disable=None)
        for _ in range(tick_epochs):
            order = torch.randperm(num_images, generator=select_rng)
            epoch_loss = torch.zeros([], dtype=torch.float64, device=device)
            for batch in order.split(batch_size):
                optimizer.zero_grad(set_to_none=True)
                for chunk in batch[rank::world_size].split(batch_gpu):
                    real = images[chunk].to(device).to(torch.float32) / 127.5 - 1
                    fake = G(latents[chunk].to(device), generator=noise_rng)
                    per_sample = loss_fn(fake, real)
                    per_sample.sum().div(len(batch)).backward()
                    epoch_loss += per_sample.detach().sum()

                # Sum the gradients of all ranks (one all-reduce), then step.
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
                if world_size > 1:
                    torch.distributed.all_reduce(flat)
                torch.nan_to_num(flat, nan=0, posinf=1e5, neginf=-1e5, out=flat)
                for p, grad in zip(params, flat.split([p.numel() for p in params])):
                    p.grad = grad.reshape(p.shape)
                for group in optimizer.param_groups:
                    group['lr'] = learning_rate(optimizer_kwargs['lr'], cur_step, cur_epoch, lr_warmup_steps, lr_decay_epochs, lr_decay)
                optimizer.step()

                # Moving average of G.
                with torch.no_grad():
                    for p_ema, p in zip(G_ema.parameters(), params):
                        p_ema.lerp_(p, 1 - ema_beta)
                    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
                        b_ema.copy_(b)
                cur_step += 1
                cur_nimg += len(batch)
                if pbar is not None:
                    pbar.update(1)
            if world_size > 1:
                torch.distributed.all_reduce(epoch_loss)
            if not torch.isfinite(epoch_loss):
                raise click.ClickException(f'the loss became non-finite in epoch {cur_epoch} (tick {cur_tick}): lower the learning '
                                           'rate (--lr), or resume from an earlier snapshot with a lower one.')
            loss_sum += epoch_loss
            cur_epoch += 1
        if pbar is not None:
            pbar.close()
        cur_tick += 1
        done = cur_epoch >= total_epochs

        # 3. Report.
        tick_end_time = time.time()
        stats = {
            'Progress/tick': cur_tick, 'Progress/epoch': cur_epoch, 'Progress/step': cur_step, 'Progress/kimg': cur_nimg / 1e3,
            'Progress/lr': optimizer.param_groups[0]['lr'],
            'Loss/loss': float(loss_sum) / max(tick_epochs * num_images, 1),
            **{f'Select/{key}': value for key, value in select_stats.items()},
            'Timing/total_sec': tick_end_time - start_time,
            'Timing/sec_per_tick': tick_end_time - tick_start_time,
            'Timing/select_sec': select_sec,
            'Timing/sec_per_kimg': (tick_end_time - tick_start_time - select_sec) / max(cur_nimg - tick_start_nimg, 1) * 1e3,
        }
        if device.type == 'cuda':
            stats['Resources/peak_gpu_mem_gb'] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        fields = [f'tick {cur_tick:<5d}', f'epoch {cur_epoch:<7d}', f'kimg {cur_nimg / 1e3:<9.1f}',
                  f'time {_format_time(tick_end_time - start_time):<12s}', f'sec/tick {stats["Timing/sec_per_tick"]:<7.1f}',
                  f'select {select_sec:<7.1f}', f'loss {stats["Loss/loss"]:<7.4f}']
        fields += [f'rejected {select_stats["rejected_frac"]:<6.3f}', f'nearest {select_stats["distance_mean"]:<7.4f}',
                   f'pool img/s {select_stats["decode_img_per_sec"]:<7.1f}']
        if 'Resources/peak_gpu_mem_gb' in stats:
            fields.append(f'gpumem {stats["Resources/peak_gpu_mem_gb"]:<6.2f}')
        log(' '.join(fields))

        # Save image snapshot.
        if rank == 0 and (done or (image_snapshot_ticks is not None and cur_tick % image_snapshot_ticks == 0)):
            render_grid(f'fakes-epoch-{cur_epoch:06d}.png')

        # Save network snapshot.
        if done or (snapshot_ticks is not None and cur_tick % snapshot_ticks == 0):
            rng_state = _rng_state(noise_rng, device)
            ranks = [None] * world_size
            if world_size > 1:
                torch.distributed.all_gather_object(ranks, rng_state)
            else:
                ranks = [rng_state]
            if rank == 0:
                path = os.path.join(run_dir, f'snapshot-epoch-{cur_epoch:06d}.pt')
                snapshot.save(path, dict(
                    options=options, G_init_kwargs=G.init_kwargs, G=G.state_dict(), G_ema=G_ema.state_dict(),
                    optimizer=optimizer.state_dict(), latents=latents,
                    progress=dict(tick=cur_tick, epoch=cur_epoch, step=cur_step, nimg=cur_nimg),
                    rng=dict(world_size=world_size, shared=select_rng.get_state(), ranks=ranks)))
                log(f'Saved {path}')

        # Update logs.
        if stats_jsonl is not None:
            stats_jsonl.write(json.dumps(dict(stats, timestamp=time.time())) + '\n')
            stats_jsonl.flush()
        if done:
            break

    # Done.
    if stats_jsonl is not None:
        stats_jsonl.close()
    log()
    log('Exiting...')


def _format_time(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h {s // 60 % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {s // 3600 % 24:02d}h {s // 60 % 60:02d}m'


#----------------------------------------------------------------------------
