"""The settings of one `rtm-mapping bench` run, as every part receives them, and their defaults."""

import dataclasses
from typing import Optional, Tuple

import torch

from rtm_mapping import core

# Option defaults of a full run, and the tiny settings of --quick (a smoke test, not a measurement).
# map_h: RTM steps of the generator and dispatch parts; --quick uses 2 to keep its compile short.
RUNS = {
    'full':  dict(batch=64, repeats=50, warmup=10, gen_repeats=5, gen_warmup=1, channel_div=1, gen_batch_div=1, map_h=core.DEFAULTS['steps']),
    'quick': dict(batch=4,  repeats=2,  warmup=1,  gen_repeats=1, gen_warmup=1, channel_div=16, gen_batch_div=16, map_h=2),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    device:         torch.device
    official:       bool            # A StyleGAN2-ADA checkout is on sys.path: official MLP, RTM MappingNetwork, generator part.
    quick:          bool            # --quick: a smoke test; no target is judged at its settings.
    batch:          int             # Mapper batch of the mapper and memory parts.
    repeats:        int             # Timed repeats of each mapper.
    warmup:         int             # Warm-up calls of each mapper.
    gen_repeats:    int             # Timed repeats of each generator.
    gen_warmup:     int             # Warm-up calls of each generator.
    channel_div:    int             # Generator channels divided by this (1 = official).
    gen_batch_div:  int             # Generator batch divided by this (1 = official).
    map_h:          int             # RTM steps H of the generator and dispatch parts.
    compile_mode:   str             # torch.compile mode of the captured RTM; 'none' = eager only.
    configs:        Tuple[str, ...] = ()          # Generator configurations of the generator part.
    paper512_channel_div: Optional[int] = None    # paper512's channels divided by this too.

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), device=self.device.type, configs=list(self.configs))


def settings(device: torch.device, official: bool, quick: bool, compile_mode: str, configs=(), paper512_channel_div=None, **given) -> Settings:
    """Each option given (not None), else its RUNS default (full or --quick)."""
    run = dict(RUNS['quick' if quick else 'full'])
    run.update({key: value for key, value in given.items() if value is not None})
    return Settings(device=device, official=official, quick=quick, compile_mode=compile_mode, configs=tuple(configs),
                    paper512_channel_div=paper512_channel_div, **run)
