"""
Every mistake a user can make on train.py's command line ends the same way: a non-zero exit, one line on stderr that
names the flag or the file, no traceback, and nothing trained or written. Each case is a train.py subprocess on a tiny
generated face set; they run in parallel and fail before the first step, except an unreadable labeled image, met
when a step draws it.
"""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sources.faces import generate_faces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
ENV = dict(os.environ, OMP_NUM_THREADS='1')

# name: (flags added to a valid command, what the line must name (any one), why train.py would fail the case)
CASES = {
    'data_missing': (('--data', '{tmp}/no_such_set'), ('--data', '{tmp}/no_such_set'), None),
    'unlabeled_empty': (('--unlabeled', '{tmp}/empty'), ('--unlabeled', '{tmp}/empty'), None),
    'batch_size_0': (('--batch-size', '0'), ('--batch-size',), None),
    'mu_0': (('--mu', '0'), ('--mu',), None),
    'lr_negative': (('--lr', '-0.1'), ('--lr',), None),
    'steps_0': (('--steps', '0'), ('--steps',), None),
    'dtm_min_above_tau': (('--tau', '0.8', '--dtm-min', '0.9'), ('--dtm-min',), None),
    'weights_text': (('--weights', '{tmp}/notes.txt'), ('--weights', '{tmp}/notes.txt'), None),
    'weights_empty': (('--weights', '{tmp}/empty.pt'), ('--weights', '{tmp}/empty.pt'), None),
    'weights_image': (('--weights', '{tmp}/face.png'), ('--weights', '{tmp}/face.png'), None),
    'weights_code': (('--weights', '{tmp}/code.pt'), ('--weights', '{tmp}/code.pt'), None),
    'resume_text': (('--resume', '{tmp}/notes.txt'), ('--resume', '{tmp}/notes.txt'), None),
    'resume_empty': (('--resume', '{tmp}/empty.pt'), ('--resume', '{tmp}/empty.pt'), None),
    'resume_image': (('--resume', '{tmp}/face.png'), ('--resume', '{tmp}/face.png'), None),
    'resume_missing': (('--resume', '{tmp}/no_such.pt'), ('--resume', '{tmp}/no_such.pt'), None),
    'out_is_a_file': (('--out', '{tmp}/notes.txt'), ('--out', '{tmp}/notes.txt'), None),
    # a pool-labels file whatever its bytes: the line names the flag and the file together
    'pool_labels_image': (('--pool-labels', '{tmp}/face.png'), ('--pool-labels: {tmp}/face.png',), None),
    'pool_labels_latin1': (('--pool-labels', '{tmp}/latin1.csv'), ('--pool-labels: {tmp}/latin1.csv, line 2',), None),
    'pool_labels_one_field': (('--pool-labels', '{tmp}/notes.txt'), ('--pool-labels: {tmp}/notes.txt, line 1',), None),
    # met while training (in a loader worker) or while decoding the set into memory
    'labeled_image_unreadable': (('--data', '{tmp}/bad_faces', '--workers', '2', '--steps', '10'),  # every image
                                 ('{tmp}/bad_faces/train/Anger/bad.png',), None),
    'labeled_image_unreadable_in_memory': (('--data', '{tmp}/bad_faces', '--in-memory', 'yes'),
                                           ('{tmp}/bad_faces/train/Anger/bad.png',), None),
}
NOT_CODE = ('weights_text', 'weights_empty', 'weights_image', 'resume_text', 'resume_empty', 'resume_image')


class RunsCode:
    """Unpickling this object calls open(marker, 'w'): code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


@pytest.fixture(scope='module')
def failures(tmp_path_factory):
    """Every case run at once; name -> (tmp, its --out folder, the CompletedProcess)."""
    tmp = tmp_path_factory.mktemp('errors')
    faces = str(tmp / 'faces')
    generate_faces(faces, counts=(16, 8, 16), identities=(2, 2, 2))
    os.makedirs(tmp / 'empty')
    (tmp / 'notes.txt').write_text('These are not weights: the run used lr 0.03 and 500 steps.\n')
    (tmp / 'empty.pt').write_bytes(b'')
    (tmp / 'latin1.csv').write_bytes(b'train_00001.png,Happiness\nl\xe4chelnd_00002.png,Happiness\n')
    image = next(os.path.join(d, f) for d, _, files in sorted(os.walk(os.path.join(faces, 'train'))) for f in files)
    shutil.copyfile(image, tmp / 'face.png')
    torch.save(dict(model=RunsCode(tmp / 'pwned')), tmp / 'code.pt')
    shutil.copytree(faces, tmp / 'bad_faces')
    (tmp / 'bad_faces' / 'train' / 'Anger' / 'bad.png').write_text('not an image')

    def run(name):
        out = tmp / f'out_{name}'
        flags = [f.format(tmp=tmp) for f in CASES[name][0]]
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), '--data', faces, '--unlabeled',
               os.path.join(faces, 'unlabeled'), '--img-size', '32', '--batch-size', '4', '--mu', '2', '--workers', '0',
               '--steps', '2', '--out', str(out), *flags]
        return name, (tmp, out, subprocess.run(cmd, cwd=tmp, env=ENV, capture_output=True, text=True, timeout=300))
    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, CASES))


@pytest.mark.parametrize('case', [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=why) if why else ())
                                  for name, (_, _, why) in CASES.items()])
def test_one_clear_line(failures, case):
    tmp, out, result = failures[case]
    stderr = result.stderr.strip()
    assert result.returncode != 0, result.stdout + result.stderr
    assert 'Traceback' not in stderr and len(stderr.splitlines()) == 1, stderr
    names = [n.format(tmp=tmp) for n in CASES[case][1]]
    assert any(n in stderr for n in names), f'{stderr!r} names none of {names}'
    if case in NOT_CODE:  # a file that is merely not a checkpoint is not called dangerous
        assert 'run code' not in stderr, stderr
    if case == 'weights_code':
        assert 'code' in stderr and not (tmp / 'pwned').exists(), stderr
    if case not in ('out_is_a_file', 'labeled_image_unreadable'):  # the last one is met by the first step
        assert not out.exists(), 'the run started before the mistake was found'
