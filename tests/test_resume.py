"""
Long runs: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one (CPU); a non-finite
loss stops training without touching the last good checkpoint; a checkpoint or --weights file that would run
code when unpickled is refused. Training runs are train.py subprocesses on a tiny generated face set.
"""
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from sources.faces import generate_faces
from model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
ENV = dict(os.environ, OMP_NUM_THREADS='1')  # the same thread count in every run, and light on shared CPUs


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('data') / 'faces')
    generate_faces(root, counts=(32, 16, 64), identities=(4, 4, 8))
    return root


def command(faces, out, *extra, script=None):
    return [sys.executable, *(script or [os.path.join(ROOT, 'train.py')]), '--data', faces,
            '--unlabeled', os.path.join(faces, 'unlabeled'), '--img-size', '32', '--batch-size', '4', '--mu', '2',
            '--log-every', '5', '--out', str(out), *extra]


def train(cmd, cwd, check=True):
    result = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_identical(a, b, where='checkpoint'):
    """Tensors bit for bit (torch.equal), everything else with ==, recursively."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f'{where}[{k!r}]')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f'{where}[{i}]')
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


STATE = ('model', 'ema_model', 'optimizer', 'scheduler', 'scaler', 'threshold', 'step', 'best_f1',
         'best_metrics')


@pytest.fixture(scope='module')
def runs(faces, tmp_path_factory):
    """a: an uninterrupted run; b: the same run killed with SIGKILL after its first checkpoint, then resumed."""
    tmp = tmp_path_factory.mktemp('runs')
    common = ('--steps', '10', '--save-every', '4', '--eval-every', '4', '--seed', '1')
    # the reference runs without data-loader workers; the interrupted run uses one: augmentation is seeded by
    # stream position, so the worker layout must not matter
    reference = subprocess.Popen(command(faces, tmp / 'a', *common, '--workers', '0'), cwd=tmp, env=ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cmd = command(faces, tmp / 'b', *common, '--workers', '1')
    run = subprocess.Popen(cmd, cwd=tmp, env=ENV, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp / 'b' / 'last.pt'
    deadline = time.time() + 240
    while not last.exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)  # the run and its loader worker, at once, like a lost node
    assert run.wait() == -signal.SIGKILL, 'the run ended before it could be killed'
    killed_at = load(last)['step']
    with open(tmp / 'b' / 'log.jsonl', 'a') as log:  # what a run logs after its last checkpoint, cut by the kill
        log.write(json.dumps(dict(event='train', step=killed_at + 1, loss_s=-1.0)) + '\n{"event": "tra')
    train(cmd + ['--resume'], tmp)  # bare --resume: OUT/last.pt
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    return tmp, killed_at


def test_resume_after_kill_is_exact(runs):
    tmp, killed_at = runs
    assert 0 < killed_at < 10
    a, b = load(tmp / 'a' / 'last.pt'), load(tmp / 'b' / 'last.pt')
    assert a['step'] == b['step'] == 10
    for key in STATE:  # weights, EMA, BN buffers, momentum, LR schedule, DTM: bit for bit
        assert_identical(a[key], b[key], key)
    assert_identical(load(tmp / 'a' / 'best.pt')['ema_model'], load(tmp / 'b' / 'best.pt')['ema_model'])
    assert f'"event": "start", "step": {killed_at}' in (tmp / 'b' / 'log.jsonl').read_text()


def test_resumed_log_holds_each_step_once(runs):
    """The records logged after the checkpoint are dropped on resume: the log reads as the uninterrupted run's."""
    tmp, killed_at = runs
    timing = ('time', 'images_per_s', 'data_wait')  # wall-clock measurements differ between any two runs

    def records(run):
        lines = (tmp / run / 'log.jsonl').read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]
    a, b = records('a'), records('b')
    assert [r['step'] for r in b if r['event'] == 'start'] == [0, killed_at]
    assert [r['step'] for r in a if r['event'] != 'start'] == [r['step'] for r in b if r['event'] != 'start']
    # a train record sums its logging interval (5 steps): the one the resume splits differs, every other is equal
    split = lambda r: r['event'] == 'train' and killed_at < r['step'] < killed_at + 5  # noqa: E731
    assert [r for r in a if r['event'] != 'start' and not split(r)] == \
        [r for r in b if r['event'] != 'start' and not split(r)]


def test_nonfinite_loss_keeps_last_checkpoint(runs, faces, tmp_path):
    for name in ('last.pt', 'best.pt'):
        shutil.copy2(runs[0] / 'b' / name, tmp_path / name)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob('*.pt')}
    # extend the finished 10-step run to 14 steps (resume with another --steps) and make the loss of step 11 NaN;
    # without the check, step 12 would save the broken model
    poison = ('import runpy, sys, torch.nn.functional as F\n'
              f'sys.path.insert(0, {ROOT!r})\n'
              'ce = F.cross_entropy\n'
              'def nan_at_step_11(*args, **kwargs):\n'
              '    loss, frame = ce(*args, **kwargs), sys._getframe(1)\n'
              '    while "step" not in frame.f_globals:  # the caller may be a helper of train.py\'s\n'
              '        frame = frame.f_back\n'
              '    return loss * float("nan") if frame.f_globals["step"] == 10 else loss\n'
              'F.cross_entropy = nan_at_step_11\n'
              'sys.argv = sys.argv[1:]\n'
              'runpy.run_path(sys.argv[0], run_name="__main__")\n')
    result = train(command(faces, tmp_path, '--resume', '--steps', '14', '--save-every', '2', '--workers',
                           '0', script=['-c', poison, os.path.join(ROOT, 'train.py')]), tmp_path, check=False)
    assert result.returncode != 0
    assert 'non-finite loss at step 11' in result.stderr, result.stdout + result.stderr
    for path, (content, mtime) in before.items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime, f'{path.name} was rewritten'
    assert '"event": "stop", "step": 11' in (tmp_path / 'log.jsonl').read_text()


class RunsCode:
    """Unpickling this object calls open(marker, 'w'): code execution, the reason for weights_only=True."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def test_code_in_a_checkpoint_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pt'
    torch.save(dict(model=RunsCode(marker), step=1), evil)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['train.py', '--resume', str(evil)])
    with pytest.raises(SystemExit, match='evil.pt: holds objects other than tensors and plain data'):
        runpy.run_path(os.path.join(ROOT, 'train.py'), run_name='__main__')  # train.py --resume evil.pt
    with pytest.raises(ValueError, match='could run code when loaded'):
        build_model('resnet18', 8, str(evil))  # what train.py --weights evil.pt calls
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load does run it
    assert marker.exists()


def test_a_checkpoint_state_that_does_not_fit_the_run_is_one_line(runs, faces):
    """A per-image or per-class state of another size (another pool, other classes): one line, no traceback."""
    tmp, _ = runs
    checkpoint = load(tmp / 'a' / 'last.pt')
    name, state = next((k, v) for k, v in checkpoint['threshold'].items() if torch.is_tensor(v) and v.ndim == 1)
    checkpoint['threshold'][name] = torch.cat([state, state[:1]])
    torch.save(checkpoint, tmp / 'other.pt')
    result = train(command(faces, tmp / 'c', '--resume', str(tmp / 'other.pt'), '--steps', '12'), tmp, check=False)
    stderr = result.stderr.strip()
    assert result.returncode != 0 and 'Traceback' not in stderr and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f'train.py: error: --resume: the threshold in {tmp / "other.pt"} does not fit this run')
    assert name in stderr, stderr  # which tensor
