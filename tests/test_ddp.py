"""
DistributedDataParallel on the CPU: `torchrun --nproc_per_node 2 train.py` with gloo. Both ranks must end with the
same weights (model and EMA, BN buffers included), optimizer and DTM state; the logged validation metrics must equal
a single-process evaluation of the saved checkpoint (each validation image counted once); a NaN on one rank stops
all ranks at the step it happened, after a resume with a different --steps.
"""
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

import data
from sources.faces import generate_faces
from evaluate import evaluate
from model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# run train.py as torchrun's script, then save what this rank holds; NAN_STEP/NAN_RANK poison one rank's loss
HOOK = f'''
import os, runpy, sys, torch, torch.nn.functional as F
sys.path.insert(0, {ROOT!r})
ce, nan_step, nan_rank = F.cross_entropy, int(os.environ.get('NAN_STEP', 0)), int(os.environ.get('NAN_RANK', 0))
def cross_entropy(*args, **kwargs):
    frame = sys._getframe(1)
    while 'step' not in frame.f_globals:  # called from a helper of train.py's
        frame = frame.f_back
    train = frame.f_globals
    poison = train['step'] + 1 == nan_step and train['rank'] == nan_rank
    return ce(*args, **kwargs) * (float('nan') if poison else 1)
F.cross_entropy = cross_entropy
sys.argv = [{os.path.join(ROOT, 'train.py')!r}, *sys.argv[1:]]
g = runpy.run_path(sys.argv[0], run_name='__main__')
torch.save({{k: g[k].state_dict() for k in ('raw_model', 'ema_model', 'optimizer', 'scheduler', 'threshold')}},
           os.path.join(os.environ['DUMP'], f'rank{{g["rank"]}}.pt'))
'''


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('data') / 'faces')
    generate_faces(root, counts=(32, 15, 64), identities=(4, 4, 8))  # 15: rank shards of 8 and 7
    return root


def torchrun(tmp, faces, *args, **env):
    """Two gloo processes in tmp; train.py writes tmp/out, each rank its final state to tmp/rank{r}.pt."""
    (tmp / 'hook.py').write_text(HOOK)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(tmp / 'hook.py'), '--data', faces, '--unlabeled', os.path.join(faces, 'unlabeled'),
           '--img-size', '32', '--batch-size', '4', '--mu', '2', '--workers', '0', '--log-every', '2',
           '--save-every', '2', '--eval-every', '2', '--out', str(tmp / 'out'), *args]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1', DUMP=str(tmp), **env))


@pytest.fixture(scope='module')
def ddp_run(faces, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    result = torchrun(tmp, faces, '--steps', '4')
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_identical(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f'{where}[{k!r}]')
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f'{where}[{i}]')
    elif torch.is_tensor(a):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_two_ranks_agree_and_eval_covers_the_set_once(faces, ddp_run):
    rank0, rank1 = load(ddp_run / 'rank0.pt'), load(ddp_run / 'rank1.pt')
    assert_identical(rank0, rank1, 'rank1 vs rank0')  # BN buffers: sync_buffers; DTM: all-reduced statistics
    kappa = rank0['threshold']['kappa']
    assert not torch.equal(kappa, torch.full_like(kappa, 1 / 8)), 'the DTM never updated'
    checkpoint = load(ddp_run / 'out' / 'last.pt')
    for key, saved in (('raw_model', 'model'), ('ema_model', 'ema_model'), ('optimizer', 'optimizer'),
                       ('threshold', 'threshold')):
        assert_identical(rank0[key], checkpoint[saved], saved)
    assert checkpoint['versions']['world_size'] == 2 and checkpoint['step'] == 4
    assert sorted(p.name for p in (ddp_run / 'out').iterdir()) == ['best.pt', 'last.pt', 'log.jsonl']

    records = [json.loads(line) for line in (ddp_run / 'out' / 'log.jsonl').read_text().splitlines()]
    assert [r['event'] for r in records] == ['start', 'train', 'eval', 'train', 'eval', 'end']  # rank 0 only
    logged = records[-2]
    assert logged['step'] == 4
    model = build_model(checkpoint['config']['arch'], len(checkpoint['classes']))
    model.load_state_dict(checkpoint['ema_model'])
    val = data.load_labeled(faces, 'val')
    val.decode = data.Decode(32)
    single = evaluate(model, data.loader(val, 64, workers=0), 'cpu', checkpoint['classes'], nullcontext())
    assert logged['confusion'] == single['confusion']
    assert sum(map(sum, logged['confusion'])) == len(val) == 15
    for key in ('macro_f1', 'accuracy', 'per_class'):
        assert logged[key] == single[key], key


def test_own_bn_two_forwards_with_a_graph_under_ddp(faces, tmp_path):
    """--own-bn: labeled and strong views in two forwards before one backward; the ranks still agree."""
    result = torchrun(tmp_path, faces, '--steps', '2', '--own-bn')
    assert result.returncode == 0, result.stdout + result.stderr
    assert_identical(load(tmp_path / 'rank0.pt'), load(tmp_path / 'rank1.pt'), 'rank1 vs rank0')
    assert load(tmp_path / 'out' / 'last.pt')['config']['own_bn']


def test_nan_on_one_rank_stops_all_at_that_step(faces, ddp_run, tmp_path):
    # resume to a longer run; rank 1's loss at step 7 is NaN: the check at step 8 must name step 7 (rank 0's own
    # first NaN is at step 8, after the all-reduced NaN gradient) and must not save step 8
    result = torchrun(tmp_path, faces, '--steps', '10', '--resume', str(ddp_run / 'out' / 'last.pt'),
                      NAN_STEP='7', NAN_RANK='1')
    assert result.returncode != 0
    assert 'non-finite loss at step 7' in result.stderr, result.stdout + result.stderr
    checkpoint = load(tmp_path / 'out' / 'last.pt')
    assert checkpoint['step'] == 6
    assert all(t.isfinite().all() for t in checkpoint['model'].values() if t.is_floating_point())


def test_ranks_draw_disjoint_samples():
    stream = data.InfiniteSampler(10, seed=3)
    first = [next(x) for x in [iter(stream)] for _ in range(40)]
    ranks = [iter(data.InfiniteSampler(10, seed=3, rank=r, world=2)) for r in (0, 1)]
    shards = [[next(ranks[r]) for _ in range(20)] for r in (0, 1)]
    assert shards[0] == first[0::2] and shards[1] == first[1::2]  # positions r, r + world, ...: no sample twice
    resumed = iter(data.InfiniteSampler(10, seed=3, rank=1, world=2, start=7))
    assert [next(resumed) for _ in range(13)] == shards[1][7:]  # resume skips step * batch per rank
