"""The `rtm-mapping` command line. Each subcommand lives in its own module and is imported on use."""

import importlib

import click

from rtm_mapping import __version__

# name: (module, attribute, one-line help)
COMMANDS = {
    'get-stylegan': ('stylegan2_ada_patch.official', 'get_stylegan', 'Clone NVIDIA\'s StyleGAN code at the commit rtm-mapping is tested against.'),
    'patch':        ('stylegan2_ada_patch.patcher', 'patch',        'Add --map=rtm to a StyleGAN2-ADA or StyleGAN3 train.py (and --revert/--check).'),
    'make-dataset': ('stylegan2_ada_patch.dataset', 'make_dataset', 'Write a small synthetic image dataset zip, to see a run without downloads.'),
    'cpu':          ('stylegan2_ada_patch.cpu',     'cpu',          'Run an official script (generate.py, ...) on the CPU, for smoke tests.'),
    'train':        ('rtm_mapping.configs',         'train',        'Run the patched train.py with a config from training_configs/.'),
    'detectors':    ('rtm_mapping.detectors',       'detectors',    'Install or list the feature networks the metrics use, for offline machines.'),
    'sweep-h':      ('rtm_mapping.sweep',           'sweep_h',      'Evaluate one RTM pickle at several inference H (Table 4).'),
    'bench':        ('rtm_mapping.bench.command',   'bench',        'Benchmark RTM against the MLP mapper, side by side.'),
    'swap':         ('rtm_mapping.swap',            'swap',         'Replace the mapper of a pretrained pickle with a distilled RTM.'),
    'info':         ('rtm_mapping.info',            'info',         'Describe the networks of a pickle.'),
    'set-h':        ('rtm_mapping.set_h',           'set_h',        'Store another inference H in an RTM pickle.'),
    'mode-coverage': ('rtm_mapping.mode_coverage',  'mode_coverage', 'Toy GAN on CPU: modes covered by RTM against the MLP mapper.'),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        with formatter.section('Commands'):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])


@click.group(cls=_LazyGroup)
@click.version_option(__version__, prog_name='rtm-mapping')
def main():
    """Recursive Token Mapper for StyleGAN2-ADA and StyleGAN3. Run `rtm-mapping COMMAND --help` for details."""


if __name__ == '__main__':
    main()
