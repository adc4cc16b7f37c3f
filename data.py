"""
Data pipeline: labeled and unlabeled datasets, weak and strong augmentation, samplers and loaders.

Where the images come from is formats.py (labeled sets as their owners ship them), pools.py (unlabeled faces:
folders, RecordIO, labeled sets) and faces.py (the built-in procedural faces). This file turns them into batches:
    python data.py PATH [PATH ...] [--json]    shows what a dataset holds before you train on it (format, images
                                               per class and split, what was skipped and why; or the pool size)
    python data.py                             generates the built-in face set into data/faces
"""
import argparse
import bisect
import contextlib
import itertools
import json
import os
import sys
from collections import Counter

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from sources import faces, formats, pools

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# -----------------------------------------------------------------------------
# augmentation


class Augment:
    """decode -> uint8 tensor at img_size, then the weak view (flip + translate) and, for unlabeled images, the
    strong view (weak + RandAugment + Cutout). Both views are made from one decode. On 48-112 px faces the cost
    of a transform is mostly per-call overhead, so the weak view, the normalisation and Cutout are written out
    (torchvision's v2 transforms, same distributions) and RandAugment runs on PIL images, where it is faster
    (python bench.py measures each stage). grey=True turns every image grey (3 equal channels): a model trained on
    grey labeled faces (FER2013) never sees colour, so colour unlabeled faces (LFW) would lie outside its domain."""

    def __init__(self, img_size, grey=False):
        self.size, self.pad, self.grey = img_size, img_size // 8, grey
        self.resize = v2.Resize((img_size, img_size), antialias=True)
        self.randaugment = v2.RandAugment(num_ops=2, magnitude=10)
        self.mean, self.std = (255 * torch.tensor(v).view(3, 1, 1) for v in (MEAN, STD))

    def decode(self, image):
        image = v2.functional.pil_to_tensor(image)
        if self.grey:  # ITU-R 601 luma, as PIL's convert('L')
            image = v2.functional.rgb_to_grayscale(image, num_output_channels=3)
        return image if list(image.shape[-2:]) == list(self.resize.size) else self.resize(image)

    def weak(self, image):
        """RandomHorizontalFlip + RandomCrop(img_size, padding=img_size // 8, padding_mode='reflect'): a flip with
        probability 1/2, then a translation by up to img_size/8 pixels each way, reflect-padded."""
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        image = torch.nn.functional.pad(image, [self.pad] * 4, mode='reflect')
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        return image[:, top:top + self.size, left:left + self.size]

    def normalize(self, image):
        """ToDtype(float32, scale=True) then Normalize(MEAN, STD), in one pass: (x - 255 mean) / (255 std)."""
        return image.to(torch.float32).sub_(self.mean).div_(self.std)

    def cutout(self, image):
        """RandomErasing(p=1, scale=(0.02, 0.15), ratio=(0.3, 3.3), value=0) on a normalised view, in place: a box
        of 2-15% of the area, aspect ratio log-uniform in [0.3, 3.3] (so it always fits), anywhere, set to 0."""
        area, log_ratio, top, left = torch.rand(4).tolist()
        area, ratio = self.size ** 2 * (0.02 + 0.13 * area), 0.3 * 11 ** log_ratio
        h, w = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        top, left = int(top * (self.size - h + 1)), int(left * (self.size - w + 1))
        image[:, top:top + h, left:left + w] = 0
        return image

    def eval_view(self, image):
        return self.normalize(self.decode(image))

    def weak_view(self, image):
        return self.normalize(self.weak(self.decode(image)))

    def two_views(self, image):
        image = self.decode(image)
        weak = self.weak(image)
        strong = v2.functional.pil_to_tensor(self.randaugment(v2.functional.to_pil_image(self.weak(image))))
        return self.normalize(weak), self.cutout(self.normalize(strong))


# -----------------------------------------------------------------------------
# datasets


def seeded(key):
    """Keys from InfiniteSampler are (index, seed): the augmentation of a sample is a function of its position
    in the stream, whatever worker draws it, so a resumed run sees exactly the images it would have seen."""
    if isinstance(key, tuple):
        index, seed = key
        # the CPU generator only, which the augmentations draw from: torch.manual_seed also seeds every
        # accelerator's generator, and while those are uninitialised (a loader worker) queues each call with a
        # formatted stack trace, ~0.7 ms a sample (bench.py); nor would fork_rng(devices=[]) restore them
        torch.default_generator.manual_seed(seed)
        return index
    return key


class LabeledSet(Dataset):
    """items[i] is an image source for open_image, labels[i] its class index into classes."""

    def __init__(self, items, labels, classes, name, skipped=None):
        self.items, self.labels, self.classes, self.name = items, labels, classes, name
        self.skipped = skipped or {}  # reason -> count, for `python data.py` and the logs
        self.view = None  # set by the user of the set: Augment.weak_view or Augment.eval_view

    def __len__(self):
        return len(self.items)

    def read(self, index):
        try:
            return formats.open_image(self.items[index])
        except (OSError, ValueError) as error:
            raise RuntimeError(f'{self.name}: cannot read image {self.items[index]}: {error}') from None

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            index = seeded(key)
            return self.view(self.read(index)), self.labels[index]


def load_labeled(root, split, fmt=None):
    """The `split` ('train', 'val' or 'test') of the labeled set at root, in any format formats.py reads."""
    return LabeledSet(**formats.read_labeled(root, split, fmt))


class UnlabeledPool(Dataset):
    """The pools of one or more --unlabeled sources (open_pool) under one global index, so per-sample state
    (FlexMatch's memory) has one slot per image. Returns (weak view, strong view, index, skipped). An unreadable,
    truncated or non-image file is replaced by the next readable one and counted in `skipped`, so one bad file in
    a million never stops training."""

    def __init__(self, sources, augment):
        self.sources, self.augment = list(sources), augment
        self.ends = list(itertools.accumulate(len(s) for s in self.sources))  # source k: [ends[k-1], ends[k])

    def __len__(self):
        return self.ends[-1] if self.ends else 0

    def locate(self, i):
        k = bisect.bisect_right(self.ends, i)
        return self.sources[k], i - (self.ends[k - 1] if k else 0)

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            index = seeded(key)
            for skipped in range(100):
                i = (index + skipped) % len(self)
                source, j = self.locate(i)
                try:
                    image = source.read(j)
                except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, EOFError... on bad files
                    print(f'warning: skipping unreadable image {source.name(j)}: {error}', file=sys.stderr)
                    continue
                weak, strong = self.augment.two_views(image)
                return weak, strong, i, skipped
        source, j = self.locate(index)
        raise RuntimeError(f'100 unreadable images in a row in the unlabeled pool, from {source.name(j)}')


# -----------------------------------------------------------------------------
# samplers and loaders


class InfiniteSampler(Sampler):
    """An endless stream of (index, seed): epoch e is a permutation drawn from (seed, e), or with `weights` a
    weighted draw with replacement (class-balanced sampling). Rank r of `world` takes stream positions
    r, r + world, ... so ranks see different samples; `start` skips this rank's first `start` samples (resume)."""

    def __init__(self, size, seed, rank=0, world=1, start=0, weights=None):
        self.size, self.seed, self.rank, self.world, self.start, self.weights = size, seed, rank, world, start, weights

    def epoch_order(self, epoch):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.weights is None:
            return torch.randperm(self.size, generator=generator).tolist()
        return torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()

    def __iter__(self):
        position, epoch, order = self.start * self.world + self.rank, -1, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = self.epoch_order(epoch)
            yield order[position % self.size], (self.seed * 1_000_003 + position) % 2**62
            position += self.world


def class_balanced_weights(labels, num_classes):
    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).float()
    return (1.0 / counts.clamp(min=1))[torch.tensor(labels)]


def default_workers(cuda):
    """Processes per loader when --workers is not given. On the CPU the workers share the cores with the step: 2.
    On a GPU the cores only feed it, and the unlabeled pipeline (decode, two views, RandAugment) is what bounds the
    throughput: half the cores per loader, per process under torchrun. bench.py on a 16-core H100 host (B=16, mu=7,
    48 px) fed the step at 0.23 of its pre-made-batch throughput with 2 workers, 0.58 with 6, 0.60 with 12."""
    if not cuda:
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 2
    return max(2, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)) // 2)


def loader(dataset, batch_size, sampler=None, workers=2, pin_memory=False):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=sampler is not None, persistent_workers=workers > 0 and sampler is not None,
                      prefetch_factor=4 if workers > 0 else None)


# -----------------------------------------------------------------------------
# python data.py PATH [PATH ...] [--json]: what a dataset holds, before training on it


def describe(path, fmt=None):
    """A dict of what path holds: the labeled format and, per split, images per class and what was skipped and
    why; or, for a path in no labeled format, the size of the unlabeled pool it is."""
    try:
        fmt = fmt or formats.detect_format(path)
    except (OSError, ValueError) as error:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # indexing a folder pool reports on stdout: keep --json clean
                return dict(path=path, format='unlabeled', images=len(pools.open_pool(path)))
        except (OSError, ValueError):
            return dict(path=path, error=str(error))
    splits = {}
    for split in formats.SPLITS[fmt]:
        if fmt == 'imagefolder' and not os.path.isdir(os.path.join(path, split)):
            continue  # an ImageFolder set has the splits it has folders for
        try:
            labeled = load_labeled(path, split, fmt)
        except (OSError, ValueError) as error:
            splits[split] = dict(error=str(error))
            continue
        counts = Counter(labeled.labels)
        splits[split] = dict(images=len(labeled), source=labeled.name, skipped=labeled.skipped,
                             classes={name: counts[i] for i, name in enumerate(labeled.classes)})
    return dict(path=path, format=fmt, splits=splits)


def describe_text(found):
    if 'error' in found:
        return f'{found["path"]}: {found["error"]}'
    if found['format'] == 'unlabeled':
        return f'{found["path"]}: unlabeled pool of {found["images"]} images'
    lines = [f'{found["path"]}: {found["format"]}']
    for split, s in found['splits'].items():
        if 'error' in s:
            lines.append(f'  {split}: error: {s["error"]}')
            continue
        lines.append(f'  {split}: {s["images"]} images from {s["source"]}')
        lines.append('    ' + ', '.join(f'{name} {n}' for name, n in s['classes'].items()))
        lines.extend(f'    skipped {n}: {reason}' for reason, n in s['skipped'].items())
    return '\n'.join(lines)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='With no PATH, generate the built-in face set into data/faces. '
                                     'With PATHs, show what each holds: the detected format, images per class and '
                                     'split, and what was skipped and why; or the size of an unlabeled pool.')
    parser.add_argument('paths', nargs='*', metavar='PATH', help='labeled set roots, CSV files or unlabeled pools')
    parser.add_argument('--format', choices=formats.FORMATS, help='labeled format (default: detected from each PATH)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')
    args = parser.parse_args()
    if not args.paths:
        faces.default_data()
    else:
        found = [describe(path, args.format) for path in args.paths]
        print(json.dumps(found, indent=1) if args.json else '\n'.join(map(describe_text, found)))
        # exit status 1 when a path or a split could not be read, for scripts
        sys.exit(any('error' in f or any('error' in s for s in f.get('splits', {}).values()) for f in found))
