"""`rtm-mapping info`: what the networks of a StyleGAN2-ADA or StyleGAN3 pickle are (mapper kind, H, L,
block, parameters, w_avg)."""

import json
from typing import Dict, Optional

import click
import torch

from rtm_mapping import pickles
from stylegan2_ada_patch import checkout

#----------------------------------------------------------------------------

def describe(data: Dict) -> Dict:
    """Facts about each network of a pickle: mapper kind, RTM options, parameter count, w_avg."""
    facts = {}
    for name, value in data.items():
        if not isinstance(value, torch.nn.Module):
            facts[name] = dict(type=type(value).__name__) if value is not None else None
            continue
        entry = dict(cls=type(value).__name__, params=sum(p.numel() for p in value.parameters()))
        mapping = getattr(value, 'mapping', None)
        if name.startswith('G') and mapping is not None:
            entry['mapper'] = pickles.mapper_kind(value)
            entry['mapper_params'] = sum(p.numel() for p in mapping.parameters())
            if entry['mapper'] == 'rtm':
                rtm = mapping.rtm
                entry.update(H=rtm.steps, L=rtm.inner_steps, block=rtm.block_name, tokens=rtm.tokens, token_dim=rtm.token_dim,
                             grad_steps=rtm.grad_steps, stored_H=(value.init_kwargs.get('mapping_kwargs') or {}).get('steps'))
            else:
                entry['layers'] = getattr(mapping, 'num_layers', None)
            w_avg = getattr(mapping, 'w_avg', None)
            entry['w_avg_finite'] = None if w_avg is None else bool(torch.isfinite(w_avg).all())
        facts[name] = entry
    return facts


@click.command()
@click.argument('network_pkl', type=click.Path(exists=True, dir_okay=False), metavar='PKL')
@click.option('--json', 'as_json', is_flag=True, help='Print the facts as JSON.')
@checkout.option
def info(network_pkl: str, as_json: bool, stylegan: Optional[str]):
    """Describe the networks of a pickle: mapper kind, H, L, block, parameters, w_avg."""
    checkout.use(stylegan)
    facts = describe(pickles.load_pickle(network_pkl))
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    for name, entry in facts.items():
        if entry is None or 'cls' not in entry:
            click.echo(f'{name}: {"None" if entry is None else entry["type"]}')
            continue
        line = f'{name}: {entry["cls"]}, {entry["params"]:,} parameters'
        if 'mapper' in entry:
            if entry['mapper'] == 'rtm':
                line += (f'; mapper rtm (H={entry["H"]}, L={entry["L"]}, block={entry["block"]}, '
                         f'{entry["tokens"]}x{entry["token_dim"]} tokens, {entry["mapper_params"]:,} parameters)')
            else:
                line += f'; mapper {entry["mapper"]} ({entry["layers"]} layers, {entry["mapper_params"]:,} parameters)'
            line += f'; w_avg finite: {entry["w_avg_finite"]}'
        click.echo(line)
