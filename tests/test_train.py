"""End to end: train.py on a tiny generated set must learn, and evaluate.py must reproduce its numbers."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

from sources import faces
from sources.faces import generate_faces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
ENV = dict(os.environ, OMP_NUM_THREADS='2')


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


COLOURS = {'blue': (40, 60, 200), 'green': (40, 180, 60), 'red': (200, 40, 40), 'yellow': (220, 210, 40)}


def write_set(root, counts, generator):
    """A tiny ImageFolder set that a network learns in a few dozen steps: each class a tint, with noise and a
    random grey disc, so the task is easy but no two images are alike."""
    for split, count in counts.items():
        for name, colour in COLOURS.items():
            os.makedirs(os.path.join(root, split, name))
            for i in range(count):
                noise = torch.randint(-60, 61, (32, 32, 3), generator=generator)
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8)
                image = Image.frombytes('RGB', (32, 32), bytes(pixels.flatten().tolist()))
                x, y = torch.randint(0, 24, (2,), generator=generator).tolist()
                ImageDraw.Draw(image).ellipse((x, y, x + 8, y + 8), fill=(128, 128, 128))
                image.save(os.path.join(root, split, name, f'{i}.png'))


def test_train_learns_and_evaluate_reproduces_it(tmp_path):
    data = str(tmp_path / 'tints')
    write_set(data, dict(train=6, val=20, unlabeled=40), torch.Generator().manual_seed(0))
    out = str(tmp_path / 'run')
    result = run('train.py', '--data', data, '--unlabeled', os.path.join(data, 'unlabeled'), '--steps', '60',
                 '--batch-size', '8', '--mu', '2', '--img-size', '32', '--workers', '0',
                 '--eval-every', '30', '--log-every', '10', '--out', out)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    start, evals, end = records[0], [r for r in records if r['event'] == 'eval'], records[-1]
    assert start['event'] == 'start' and start['config']['threshold'] == 'dtm' and start['versions']['torch']
    assert start['fed_from'] == dict(labeled=0, unlabeled=0)  # on the CPU sets stream, here through 0 workers
    assert [r['step'] for r in evals] == [30, 60] and end['event'] == 'end'
    best = max(evals, key=lambda r: r['macro_f1'])
    # chance: a uniform guess scores ~1/4 macro F1, a constant guess 0.1; this must learn
    assert best['macro_f1'] > 0.7, [r['macro_f1'] for r in evals]
    assert (torch.tensor(best['confusion']).sum(0) > 0).all(), 'predictions collapse onto a few classes'
    trains = [r for r in records if r['event'] == 'train']
    low, high = start['config']['dtm_min'], start['config']['tau']
    assert all(len(r['thresholds']) == 4 and low - 1e-6 <= min(r['thresholds']) <= max(r['thresholds']) <= high + 1e-6
               for r in trains)
    assert sum(sum(r['accepted']) for r in trains) > 0, 'no pseudo-label was ever accepted'
    assert f'best validation macro F1 {best["macro_f1"]:.4f}' in result.stdout
    assert 'final per-class thresholds' in result.stdout

    checkpoint = torch.load(os.path.join(out, 'best.pt'), map_location='cpu', weights_only=True)
    assert checkpoint['classes'] == best['classes'] and checkpoint['config']['img_size'] == 32 and checkpoint['step'] == best['step']
    metrics_file = str(tmp_path / 'metrics.json')
    result = run('evaluate.py', os.path.join(out, 'best.pt'), '--data', data, '--split', 'val', '--workers', '0',
                 '--out', metrics_file)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.load(open(metrics_file))
    assert metrics['confusion'] == best['confusion']
    assert abs(metrics['macro_f1'] - best['macro_f1']) < 1e-9


def test_grey_and_lr_warmup(tmp_path):
    """--grey reaches evaluate.py through the checkpoint (the same numbers), and the learning
    rate ramps up linearly over --lr-warmup steps before the cosine decay."""
    data = str(tmp_path / 'tints')
    write_set(data, dict(train=4, val=8, unlabeled=16), torch.Generator().manual_seed(1))
    out = str(tmp_path / 'run')
    steps, warmup, lr = 8, 5, 0.02
    result = run('train.py', '--data', data, '--unlabeled', os.path.join(data, 'unlabeled'), '--steps', str(steps),
                 '--batch-size', '4', '--mu', '2', '--img-size', '32', '--workers', '0', '--grey',
                 '--lr', str(lr), '--lr-warmup', str(warmup), '--eval-every', str(steps), '--log-every', '1',
                 '--out', out)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert records[0]['config']['grey']
    lrs = [r['lr'] for r in records if r['event'] == 'train']
    expected = [lr * min(1, (k + 1) / (warmup + 1)) * math.cos(7 * math.pi * k / (16 * steps)) for k in range(1, steps + 1)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[:warmup] == sorted(lrs[:warmup]) and lrs[warmup:] == sorted(lrs[warmup:], reverse=True)
    evaluation = next(r for r in records if r['event'] == 'eval')
    result = run('evaluate.py', os.path.join(out, 'last.pt'), '--data', data, '--split', 'val', '--workers', '0',
                 '--out', str(tmp_path / 'metrics.json'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(tmp_path / 'metrics.json'))['confusion'] == evaluation['confusion']


def test_own_bn_leaves_running_statistics_to_labeled_images(tmp_path):
    """With --own-bn the BN running statistics (what evaluation uses) come from the labeled batches alone: at lr 0 a
    semi-supervised run ends with exactly the running statistics of a supervised one on the same labeled stream,
    although its unlabeled faces (white) look nothing like the labeled ones. Without --own-bn they differ."""
    data = str(tmp_path / 'tints')
    write_set(data, dict(train=4, val=4), torch.Generator().manual_seed(2))
    os.makedirs(tmp_path / 'white' / 'x')
    for i in range(8):
        Image.new('RGB', (32, 32), (255, 255, 255)).save(tmp_path / 'white' / 'x' / f'{i}.png')

    def running_statistics(name, *flags):
        out = str(tmp_path / name)
        result = run('train.py', '--data', data, '--steps', '4', '--batch-size', '4', '--mu', '2', '--img-size', '32',
                     '--workers', '1', '--lr', '0', '--eval-every', '4', '--out', out, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        checkpoint = torch.load(os.path.join(out, 'last.pt'), map_location='cpu', weights_only=True)
        return {name: {k: v for k, v in checkpoint[name].items() if k.endswith(('running_mean', 'running_var',
                                                                                  'num_batches_tracked'))}
                for name in ('model', 'ema_model')}

    supervised = running_statistics('sup', '--threshold', 'none')
    semi = ('--unlabeled', str(tmp_path / 'white'))
    own, mixed = running_statistics('own', *semi, '--own-bn'), running_statistics('mixed', *semi)
    for name in ('model', 'ema_model'):
        assert own[name].keys() == supervised[name].keys() and len(own[name]) == 3 * 20  # ResNet-18: 20 BN layers
        assert all(torch.equal(own[name][k], supervised[name][k]) for k in own[name]), name
    assert supervised['model']['bn1.num_batches_tracked'] == 4  # counted once a step, by the labeled batch
    assert not torch.equal(mixed['model']['bn1.running_mean'], supervised['model']['bn1.running_mean'])
    # a checkpoint from before --own-bn and --lambda-u-warmup existed resumes as it ran, without them, whatever the
    # new command and the new defaults say
    checkpoint = torch.load(tmp_path / 'mixed' / 'last.pt', map_location='cpu', weights_only=True)
    del checkpoint['config']['own_bn'], checkpoint['config']['lambda_u_warmup']
    torch.save(checkpoint, tmp_path / 'old.pt')
    result = run('train.py', '--resume', str(tmp_path / 'old.pt'), '--own-bn', '--steps', '5', '--workers', '0',
                 '--out', str(tmp_path / 'resumed'))
    assert result.returncode == 0, result.stderr[-3000:]
    start = json.loads(open(tmp_path / 'resumed' / 'log.jsonl').readline())
    assert start['step'] == 4 and start['config']['own_bn'] is False and start['config']['lambda_u_warmup'] == 0
    own_ema = running_statistics('own_ema', *semi, '--own-bn', '--teacher', 'ema')  # the teacher is the EMA model
    assert all(torch.equal(own_ema[name][k], supervised[name][k]) for name in own for k in own[name])


# train.py as on a one-GPU machine, up to its first CUDA call: is_available() says yes, and set_device checks its
# argument as the real one does before touching a driver (a bare 'cuda', with no index, raises ValueError)
ONE_GPU = """
import runpy, sys, torch
from torch.cuda._utils import _get_device_index
torch.cuda.is_available = lambda: True
def set_device(device):
    print('set_device', _get_device_index(device))
    sys.exit(0)
torch.cuda.set_device = set_device
sys.argv[0] = 'train.py'
runpy.run_path('train.py', run_name='__main__')
"""


def test_one_gpu_device_has_an_index_for_set_device():
    result = run('-c', ONE_GPU, '--steps', '1')
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == 'set_device 0'


def test_in_memory_pool_keeps_its_true_labels_past_an_unreadable_file(tmp_path):
    """--in-memory yes replaces an unreadable pool image by the next readable one, as streaming does: the true labels
    (--pool-labels, logged only) stay with their images. Every readable image has a label, the unreadable one (first
    in the pool) has none, so every pseudo-label made is of an image whose label is known."""
    data = str(tmp_path / 'tints')
    write_set(data, dict(train=4, val=4, unlabeled=6), torch.Generator().manual_seed(3))
    pool = tmp_path / 'pool'
    os.makedirs(pool)
    (pool / '0000.png').write_bytes(b'not an image')
    lines = []
    for name in COLOURS:
        for i in range(6):
            os.replace(os.path.join(data, 'unlabeled', name, f'{i}.png'), pool / f'{name}_{i}.png')
            lines.append(f'{name}_{i}.png,{name}')
    (tmp_path / 'labels.csv').write_text('\n'.join(lines) + '\n')
    out = str(tmp_path / 'run')
    result = run('train.py', '--data', data, '--unlabeled', str(pool), '--pool-labels', str(tmp_path / 'labels.csv'),
                 '--in-memory', '--steps', '6', '--batch-size', '4', '--mu', '2', '--img-size', '32', '--workers', '0',
                 '--eval-every', '6', '--log-every', '2', '--out', out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '1 unreadable images in the unlabeled pool' in result.stderr
    assert 'unlabeled images decoded once, in memory' in result.stdout
    records = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert records[0]['fed_from'] == dict(labeled='memory', unlabeled='memory')
    trains = [r for r in records if r['event'] == 'train']
    assert len(trains) == 3 and all(sum(r['labeled']) == sum(r['predicted']) == 2 * 8 for r in trains)


BINDINGS = ('OMP_PROC_BIND', 'OMP_PLACES', 'GOMP_CPU_AFFINITY', 'KMP_AFFINITY')
UNBOUND = {k: v for k, v in ENV.items() if k not in BINDINGS}


def cores_after_import_torch(**env):
    probe = 'import os, torch; print(len(os.sched_getaffinity(0)))'
    return int(subprocess.run([sys.executable, '-c', probe], env=dict(UNBOUND, **env), capture_output=True,
                              text=True, timeout=120).stdout)


@pytest.mark.skipif(not hasattr(os, 'sched_getaffinity') or len(os.sched_getaffinity(0)) < 2,
                    reason='needs a process free to run on 2 cores or more')
def test_a_process_bound_to_one_core_is_warned_of(tmp_path):
    """OMP_PROC_BIND binds the training thread to one core at `import torch`; the loader workers would share it."""
    if cores_after_import_torch(OMP_PROC_BIND='true') != 1 or cores_after_import_torch() < 2:
        pytest.skip("this torch's OpenMP runtime does not bind the thread here")
    data = str(tmp_path / 'tints')
    write_set(data, dict(train=2, val=2), torch.Generator().manual_seed(4))
    flags = ('train.py', '--data', data, '--threshold', 'none', '--steps', '1', '--batch-size', '2', '--img-size', '32',
             '--workers', '1', '--out')
    results = {name: subprocess.run([sys.executable, *flags, str(tmp_path / name)], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=600)
               for name, env in (('bound', dict(UNBOUND, OMP_PROC_BIND='true')), ('free', UNBOUND))}
    assert all(r.returncode == 0 for r in results.values()), [r.stderr for r in results.values()]
    assert f'may run on 1 of the {os.cpu_count()} cores' in results['bound'].stderr
    assert 'unset OMP_PROC_BIND' in results['bound'].stderr and 'may run on' not in results['free'].stderr


def test_the_built_in_pool_carries_its_true_labels(tmp_path):
    """The generator's pool labels name every file of the pool with the class it was drawn as, and a default run
    (no --data, no --pool-labels) logs and prints the precision of its pseudo-labels from them."""
    root = str(tmp_path / 'data' / 'faces')
    generate_faces(root, counts=(16, 8, 24), identities=(2, 2, 3))
    with open(faces.pool_labels(root)) as f:
        rows = [line.strip().split(',') for line in f]
    on_disk = {(name, c) for c in faces.CLASSES for name in os.listdir(os.path.join(root, 'unlabeled', c))}
    assert len(rows) == 24 and {tuple(r) for r in rows} == on_disk
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--steps', '3', '--log-every', '1',
                             '--eval-every', '3', '--batch-size', '4', '--mu', '2', '--img-size', '32', '--workers',
                             '0', '--dtm-min', '0', '--out', str(tmp_path / 'run')], cwd=tmp_path, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in open(tmp_path / 'run' / 'log.jsonl')]
    trains = [r for r in records if r['event'] == 'train']
    assert all(sum(r['labeled']) == sum(r['predicted']) == 8 for r in trains)  # every pool face has its class
    assert sum(sum(r['accepted_labeled']) for r in trains) > 0
    assert 'pseudo-labels over the run: precision' in result.stdout
