"""
The unlabeled images must matter. On a generated task that a handful of labels cannot teach but the unlabeled
images can, train.py with the DTM ends far above the supervised run (--threshold none) and far above the same DTM
run with its unlabeled loss switched off (--lambda-u 0), at the same seed and budget. The --lambda-u 0 run is the
control that isolates L_u: its unlabeled images still pass through the network in the same batches as the labeled
ones, and so move the batch-norm statistics (it often scores above the supervised run); they only add no loss. A
train.py whose unlabeled loss never reaches the weights scores like that control, and fails here.

The task: four classes, each a hue of the whole image (red, green, cyan, violet, with some spread of hue,
saturation and brightness, and pixel noise). The validation and unlabeled images have two grey discs in front,
covering much of the image; the labeled images, two per class, have none. Eight clean images do not show the
network what a disc-covered image of each class looks like, and trained on them alone it scores near chance on the
validation images; trained also on its pseudo-labels for the unlabeled images, it learns the task well within the
budget.
"""
import colorsys
import glob
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
ENV = dict(os.environ, OMP_NUM_THREADS='1')  # three runs share the cores

SIZE = 16  # pixels: the task needs no detail, and a step of ResNet-18 at 16 px is cheap on a CPU
HUES = {'red': 0.0, 'green': 0.25, 'cyan': 0.5, 'violet': 0.75}
COUNTS = dict(train=2, val=30, unlabeled=200)  # images per class
DISCS, RADIUS = 2, (0.3, 0.45)  # grey discs in front of each validation and unlabeled image; radius / side
# measured on a 2-core CPU over training seeds 0-5: DTM 0.99-1.0, supervised 0.16-0.48, --lambda-u 0 0.26-0.48; at
# 100 steps DTM is already at 0.95-1.0, so the margin does not hang on the last steps of the budget. Without the
# warm-ups of the learning rate and of lambda_u: the measured schedule, and a 150-step run has no room for them
STEPS = 150
MARGIN = 0.25


def tinted_image(hue, discs, rng):
    """The class's hue over the whole image, then `discs` grey discs of random brightness in front, drawn at 4x
    and downsampled so their edges are smooth, then uniform pixel noise."""
    scale = 4 * SIZE
    colour = colorsys.hsv_to_rgb((hue + rng.uniform(-0.04, 0.04)) % 1, rng.uniform(0.7, 1), rng.uniform(0.6, 1))
    image = Image.new('RGB', (scale, scale), tuple(round(255 * c) for c in colour))
    draw = ImageDraw.Draw(image)
    for _ in range(discs):
        radius, grey = rng.uniform(*RADIUS) * scale, round(255 * rng.uniform(0.2, 1))
        x, y = rng.uniform(radius, scale - radius), rng.uniform(radius, scale - radius)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(grey, grey, grey))
    pixels = torch.frombuffer(bytearray(image.resize((SIZE, SIZE), Image.BILINEAR).tobytes()), dtype=torch.uint8)
    noise = torch.randint(-30, 31, pixels.shape, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
    return Image.frombytes('RGB', (SIZE, SIZE), bytes((pixels.int() + noise).clamp(0, 255).tolist()))


def write_task(root, seed=0):
    """ROOT/train/<class> (clean), ROOT/val/<class> and ROOT/unlabeled/images (behind two discs)."""
    rng = random.Random(seed)
    for split, count in COUNTS.items():
        for name, hue in HUES.items():
            folder = os.path.join(root, split, 'images' if split == 'unlabeled' else name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                tinted_image(hue, 0 if split == 'train' else DISCS, rng).save(os.path.join(folder, f'{name}{i}.png'))


@pytest.fixture(scope='module')
def task(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('method') / 'hues')
    write_task(root)
    return root


def start(task, out, *flags):
    command = [sys.executable, os.path.join(ROOT, 'train.py'), '--data', task, '--unlabeled',
               os.path.join(task, 'unlabeled'), '--img-size', str(SIZE), '--batch-size', '8', '--mu', '4',
               '--steps', str(STEPS), '--eval-every', str(STEPS), '--log-every', str(STEPS), '--workers', '0',
               '--seed', '0', '--lr-warmup', '0', '--lambda-u-warmup', '0', '--out', str(out), *flags]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def final_macro_f1(process, out):
    """Validation macro F1 of the run's (EMA) model at the end of its budget, from its log."""
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    evals = [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if r['event'] == 'eval']
    for checkpoint in glob.glob(os.path.join(out, '*.pt')):  # ~130 MB each, and this test never reads them
        os.remove(checkpoint)
    assert evals and evals[-1]['step'] == STEPS
    return evals[-1]['macro_f1']


def test_unlabeled_loss_lifts_dtm_far_above_supervised_and_no_unlabeled_loss(task, tmp_path):
    flags = {'dtm': (), 'supervised': ('--threshold', 'none'), 'no unlabeled loss': ('--lambda-u', '0')}
    processes = {name: start(task, tmp_path / name.replace(' ', '_'), *f) for name, f in flags.items()}
    try:
        f1 = {name: final_macro_f1(p, tmp_path / name.replace(' ', '_')) for name, p in processes.items()}
    finally:
        for process in processes.values():  # when one run fails, stop the others
            process.kill()
            process.wait()
    # DTM learns the task (chance is ~0.25 macro F1); without L_u the same run stays far below it
    assert f1['dtm'] >= 0.85, f1
    assert f1['dtm'] - f1['supervised'] >= MARGIN, f1
    assert f1['dtm'] - f1['no unlabeled loss'] >= MARGIN, f1
