"""The StyleGAN adapters (networks.py, networks_stylegan2.py, networks_stylegan3.py) as data: the official
generator each one's Generator replaces, and the RTM arguments a generator records in its mapping_kwargs,
each set by one train.py option. The train.py hooks, `rtm-mapping train` configs and `swap` read them here;
this module imports only the core, so it needs no checkout.
"""

from typing import Dict, Optional

from rtm_mapping import core

# Official generator class: the same generator with an RTM mapper (rtm_mapping's adapter of that file).
RTM_GENERATORS = {
    'training.networks.Generator':              'rtm_mapping.networks.Generator',
    'training.networks_stylegan2.Generator':    'rtm_mapping.networks_stylegan2.Generator',
    'training.networks_stylegan3.Generator':    'rtm_mapping.networks_stylegan3.Generator',
}

# The RTM arguments train.py --map=rtm takes and a generator records in mapping_kwargs (the others stay
# at core.DEFAULTS and are not recorded), with the train.py option of each.
#   argument:      (train.py option,   what it sets,             choices, None = a positive integer)
TRAIN_OPTIONS = {
    'steps':        ('--map-h',         'RTM refinement steps H',  None),
    'inner_steps':  ('--map-l',         'RTM inner cycles L',      None),
    'block':        ('--map-block',     'RTM shared block',        core.BLOCKS),
    'tokens':       ('--map-tokens',    'RTM number of tokens',    None),
    'token_dim':    ('--map-token-dim', 'RTM channels per token',  None),
}


def option_key(argument: str) -> str:
    """The name of an argument's train.py option among click's keyword arguments and in a config's
    "train" table: 'map_h' for 'steps'."""
    return TRAIN_OPTIONS[argument][0][2:].replace('-', '_')


def rtm_kwargs(**given: Optional[object]) -> Dict[str, object]:
    """The RTM's mapping_kwargs as a generator records them: the TRAIN_OPTIONS arguments given (None = not
    given), core.DEFAULTS for the others. E.g. rtm_kwargs(steps=8) for a swapped generator at H = 8."""
    unknown = set(given) - set(TRAIN_OPTIONS)
    if unknown:
        raise TypeError(f'rtm_kwargs() takes the arguments {", ".join(TRAIN_OPTIONS)}; got {", ".join(sorted(unknown))}')
    return {name: core.DEFAULTS[name] if given.get(name) is None else given[name] for name in TRAIN_OPTIONS}
