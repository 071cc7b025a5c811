"""training_configs/: every run of Table 3 and Table 7, valid, and what train.py makes of it."""

import json
import shlex
import sys

import click
import pytest
from click.testing import CliRunner
from conftest import copy_checkout, run_patch, train_py_runs, training_options

from rtm_mapping import configs

EXPECTED = {
    'cifar10-stylegan2-mlp': ('noaug', dict(num_layers=2)),
    'cifar10-stylegan2-rtm': ('noaug', dict(steps=16, inner_steps=1, block='mixer', tokens=4, token_dim=128)),
    'cifar10-stylegan2ada-mlp': ('ada', dict(num_layers=2)),
    'cifar10-stylegan2ada-rtm': ('ada', dict(steps=16, inner_steps=1, block='mixer', tokens=4, token_dim=128)),
    'cifar10-stylegan2-mlp16': ('noaug', dict(num_layers=16)),
    'cifar10-stylegan2-mlp32': ('noaug', dict(num_layers=32)),
    'afhq512-stylegan2ada-mlp': ('ada', dict(num_layers=8)),
    'afhq512-stylegan2ada-rtm': ('ada', dict(steps=16, inner_steps=1, block='mixer', tokens=4, token_dim=128)),
}


def test_every_table_run_has_a_valid_config():
    assert set(configs.builtin_configs()) == set(EXPECTED)
    for name in EXPECTED:
        config = configs.load_config(name)
        assert 'Table' in config['source']
        for key in ('cfg', 'cond', 'kimg', 'batch', 'gamma', 'aug', 'map'):
            assert key in config['train'], (name, key)


def test_config_to_flags():
    flags = configs.train_args(configs.load_config('cifar10-stylegan2ada-rtm'))
    assert '--cfg=cifar' in flags and '--cond=0' in flags and '--map=rtm' in flags and '--map-h=16' in flags


@pytest.mark.parametrize('bad, message', [
    ({'source': 'x', 'train': {'cfg': 'cifar', 'lr': 0.1}}, "unknown train.py option 'lr'"),
    ({'source': 'x', 'train': {'kimg': '100'}}, 'kimg must be a int'),
    ({'source': 'x', 'train': {'cond': 1}}, 'cond must be a bool'),
    ({'source': 'x', 'train': {}, 'comment': 'hi'}, 'a config has keys'),
])
def test_bad_configs_are_errors(tmp_path, bad, message):
    path = tmp_path / 'bad.json'
    path.write_text(json.dumps(bad))
    with pytest.raises(click.ClickException, match=message):
        configs.load_config(str(path))


@pytest.fixture(scope='module')
def dry_runs(stylegan_root, tmp_path_factory):
    """name -> (the command `rtm-mapping train --config NAME --dry-run` runs, what train.py then prints). The
    commands come from --print-only in this process; the patched train.py runs them all in one process."""
    from stylegan2_ada_patch.dataset import write_dataset
    tmp = tmp_path_factory.mktemp('configs')
    root = copy_checkout(stylegan_root, tmp / 'stylegan2-ada-pytorch')
    assert run_patch(root)[0] == 0
    write_dataset(str(tmp / 'data'), count=4, resolution=32)
    commands = {}
    for name in sorted(EXPECTED):
        result = CliRunner().invoke(configs.train, ['--config', name, '--data', str(tmp / 'data'), '--outdir', str(tmp / 'runs'),
                                                    '--stylegan', str(root), '--dry-run', '--print-only'])
        assert result.exit_code == 0, result.output
        cd, command = result.output.splitlines()[-1].split(' && ')
        assert cd == f'cd {shlex.quote(str(root))}'
        commands[name] = shlex.split(command)
    outputs = train_py_runs(root, [command[2:] for command in commands.values()])
    return {name: (commands[name], output) for name, output in zip(commands, outputs)}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_config_passes_train_py_dry_run(dry_runs, name):
    command, (code, output) = dry_runs[name]
    assert command[:2] == [sys.executable, 'train.py'] and command[-1] == '--dry-run'
    assert code == 0, output[-3000:]
    args, _ = training_options(output)
    aug, mapping_kwargs = EXPECTED[name]
    config = configs.load_config(name)['train']
    assert args['G_kwargs']['mapping_kwargs'] == mapping_kwargs
    assert args['G_kwargs']['class_name'] == ('rtm_mapping.networks.Generator' if config['map'] == 'rtm' else 'training.networks.Generator')
    assert args['total_kimg'] == config['kimg'] and args['batch_size'] == config['batch']
    assert args['loss_kwargs']['r1_gamma'] == config['gamma']
    assert ('augment_kwargs' in args) == (aug == 'ada') and args['training_set_kwargs']['use_labels'] is False
