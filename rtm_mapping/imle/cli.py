"""`rtm-mapping imle ...`: the RS-IMLE commands. Each lives in its own module and is imported on use."""

import click

from rtm_mapping.cli import LazyGroup

# name: (module, attribute, one-line help)
COMMANDS = {
    'train':    ('rtm_mapping.imle.train',    'train',            'Train an RS-IMLE generator from a config of training_configs/.'),
    'generate': ('rtm_mapping.imle.generate', 'generate_command', 'Images of a snapshot for given seeds, and a grid, at any H and L.'),
    'metrics':  ('rtm_mapping.imle.metrics',  'metrics_command',  'FID, Precision/Recall, Density/Coverage and IS against the training set.'),
}


@click.group(cls=LazyGroup, commands_table=COMMANDS)
def imle():
    """RS-IMLE with an RTM (or MLP) mapper: the paper's Tables 1, 2 and 5. Run `rtm-mapping imle COMMAND --help`."""
