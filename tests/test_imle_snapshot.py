"""rtm_mapping.imle.snapshot: plain data that loads with weights_only=True, a ready Generator, clear refusals."""

import os
import pickle

import click
import numpy as np
import pytest
import torch

from rtm_mapping.imle import networks, snapshot

TINY = dict(decoder='fewshot', z_dim=16, w_dim=16, mapper_kwargs=dict(steps=2, inner_steps=1),
            decoder_kwargs=dict(width=8, stages=[[1, 1], [4, 1], [8, 1]]))


def _snapshot_data():
    G = networks.Generator(**TINY)
    G_ema = networks.Generator(**TINY)
    optimizer = torch.optim.AdamW(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    G(torch.randn(2, 16)).square().mean().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(1)
    return G, G_ema, dict(options=dict(seed=0, G_kwargs=TINY), G_init_kwargs=G.init_kwargs, G=G.state_dict(), G_ema=G_ema.state_dict(),
                          optimizer=optimizer.state_dict(), latents=torch.randn(5, 16),
                          progress=dict(tick=1, epoch=3, step=9, nimg=20),
                          rng=dict(world_size=1, shared=generator.get_state(),
                                   ranks=[dict(torch=torch.get_rng_state(), noise=generator.get_state(), cuda=None)]))


def test_round_trip_is_plain_data_and_gives_a_ready_generator(tmp_path):
    G, G_ema, data = _snapshot_data()
    path = str(tmp_path / 'snapshot-epoch-000003.pt')
    snapshot.save(path, data)
    assert os.listdir(tmp_path) == ['snapshot-epoch-000003.pt']     # written atomically: no .tmp left
    raw = torch.load(path, weights_only=True)                       # loading runs no code
    assert set(raw) == set(snapshot.KEYS) and raw['format'] == snapshot.FORMAT
    loaded = snapshot.load(path)
    assert loaded['progress'] == data['progress'] and torch.equal(loaded['latents'], data['latents'])
    assert loaded['optimizer']['param_groups'][0]['betas'] == (0.5, 0.999)
    z = torch.randn(3, 16)
    for ema, reference in [(True, G_ema), (False, G)]:
        restored = snapshot.load_generator(path, ema=ema)
        assert not restored.training and not any(p.requires_grad for p in restored.parameters())
        with torch.no_grad():
            expected = reference.eval()(z, generator=torch.Generator().manual_seed(2))
            assert torch.equal(restored(z, generator=torch.Generator().manual_seed(2)), expected)


def test_foreign_truncated_and_newer_files_are_refused_saying_what_they_are(tmp_path):
    _, _, data = _snapshot_data()
    good = str(tmp_path / 'good.pt')
    snapshot.save(good, data)
    cases = {}
    with open(tmp_path / 'network-snapshot-000100.pkl', 'wb') as f:
        pickle.dump(dict(G=torch.nn.Linear(2, 2), training_set_kwargs={}), f)
    cases['network-snapshot-000100.pkl'] = 'a Python pickle .*StyleGAN.*rtm-mapping train'
    with open(good, 'rb') as f:
        (tmp_path / 'cut.pt').write_bytes(f.read()[: os.path.getsize(good) // 2])
    cases['cut.pt'] = 'truncated or damaged'
    (tmp_path / 'empty.pt').write_bytes(b'')
    cases['empty.pt'] = 'empty'
    (tmp_path / 'text.pt').write_text('hello')
    cases['text.pt'] = 'not a file written by torch.save'
    torch.save(dict(state_dict=torch.nn.Linear(2, 2).state_dict()), tmp_path / 'weights.pt')
    cases['weights.pt'] = r"holding a dict of \['state_dict'\], not an RS-IMLE snapshot"
    torch.save(torch.nn.Linear(2, 2), tmp_path / 'module.pt')
    cases['module.pt'] = r'Python objects \(torch.nn.modules.linear.Linear\) that loading would have to run code for'
    torch.save(dict(data, format=snapshot.FORMAT, version=snapshot.VERSION + 1, rtm_mapping_version='9.9'), tmp_path / 'newer.pt')
    cases['newer.pt'] = 'written by rtm-mapping 9.9.*upgrade it'
    cases['missing.pt'] = 'no such file'
    for name, message in cases.items():
        with pytest.raises(click.ClickException, match=message) as err:
            snapshot.load(str(tmp_path / name))
        assert 'snapshot-epoch-*.pt written by `rtm-mapping imle train`' in err.value.message or name == 'newer.pt'


def test_save_refuses_what_would_not_load_back(tmp_path):
    _, _, data = _snapshot_data()
    with pytest.raises(TypeError, match=r'snapshot.options.kind is a numpy.float64, not plain data'):
        snapshot.save(str(tmp_path / 'x.pt'), dict(data, options=dict(kind=np.float64(1))))
    assert not os.listdir(tmp_path)
