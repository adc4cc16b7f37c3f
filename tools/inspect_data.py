"""
What a dataset holds, before training on it: the detected labeled format, images per class and split, and what was
skipped and why; or, for an unlabeled pool, its size and how many of its files open as images.

    python tools/inspect_data.py PATH [PATH ...] [--json]
    python tools/inspect_data.py                 generates the built-in face set into data/faces
"""
import argparse
import contextlib
import json
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from torch.utils.data import Dataset  # noqa: E402

import data  # noqa: E402
from fast.loading import loader  # noqa: E402
from sources import faces, formats, pools  # noqa: E402

CHECK_UP_TO = 20_000  # pools up to this size are read in full by this tool; --check-all reads any


class PoolCheck(Dataset):
    """Reads image i of a pool: '' when it opens as an image, else why not (the reason without the file's name or
    numbers, so that files failing alike are counted together)."""

    def __init__(self, pool):
        self.pool = pool

    def __len__(self):
        return len(self.pool)

    def __getitem__(self, i):
        try:
            self.pool.read(i)
            return i, ''
        except Exception as error:
            message = re.sub(r"'[^']*'|\"[^\"]*\"|<[^>]*>", '', str(error).replace(self.pool.name(i), ''))
            return i, f'{type(error).__name__}: {" ".join(re.sub(r"[0-9]+", "N", message).split())}'


def check_pool(pool, workers):
    """(readable count, {reason: count}, {reason: first file}) after reading every image of pool."""
    reasons, examples = Counter(), {}
    for batch in loader(PoolCheck(pool), 64, workers=workers, collate_fn=list):
        for i, reason in batch:
            if reason:
                reasons[reason] += 1
                examples.setdefault(reason, pool.name(i))
    return len(pool) - sum(reasons.values()), dict(reasons), examples


def describe(path, fmt=None, check_all=False, workers=0):
    """A dict of what path holds: the labeled format and, per split, images per class and what was skipped and
    why; or, for a path in no labeled format, the unlabeled pool it is: its size and, read in full when it holds up
    to CHECK_UP_TO images or with check_all, how many open as images and why the others do not."""
    try:
        fmt = fmt or formats.detect_format(path)
    except (OSError, ValueError) as error:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # indexing a folder pool reports on stdout: keep --json clean
                pool = pools.open_pool(path)
        except (OSError, ValueError):
            return dict(path=path, error=str(error))
        found = dict(path=path, format='unlabeled', images=len(pool), checked=check_all or len(pool) <= CHECK_UP_TO)
        if found['checked']:
            found['readable'], found['unreadable'], found['examples'] = check_pool(pool, workers)
        return found
    splits = {}
    for split in formats.SPLITS[fmt]:
        if fmt == 'imagefolder' and not os.path.isdir(os.path.join(path, split)):
            continue  # an ImageFolder set has the splits it has folders for
        try:
            labeled = data.load_labeled(path, split, fmt)
        except (OSError, ValueError) as error:
            splits[split] = dict(error=str(error))
            continue
        counts = Counter(labeled.labels)
        splits[split] = dict(images=len(labeled), source=labeled.name, skipped=labeled.skipped,
                             classes={name: counts[i] for i, name in enumerate(labeled.classes)})
    return dict(path=path, format=fmt, splits=splits)


def describe_text(found):
    if 'error' in found:  # the reader's messages mostly start with the path already
        error = found['error']
        return error if error.startswith(found['path']) else f'{found["path"]}: {error}'
    if found['format'] == 'unlabeled':
        line = f'{found["path"]}: unlabeled pool of {found["images"]} images'
        if not found['checked']:
            return f'{line}; not read (over {CHECK_UP_TO}: --check-all reads every image)'
        lines = [f'{line}; all read: {found["readable"]} open as images, {found["images"] - found["readable"]} '
                 f'do not']
        lines.extend(f'    {n}: {reason} (e.g. {found["examples"][reason]})'
                     for reason, n in found['unreadable'].items())
        return '\n'.join(lines)
    lines = [f'{found["path"]}: {found["format"]}']
    for split, s in found['splits'].items():
        if 'error' in s:
            lines.append(f'  {split}: error: {s["error"]}')
            continue
        lines.append(f'  {split}: {s["images"]} images from {s["source"]}')
        lines.append('    ' + ', '.join(f'{name} {n}' for name, n in s['classes'].items()))
        lines.extend(f'    skipped {n}: {reason}' for reason, n in s['skipped'].items())
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description='With no PATH, generate the built-in face set into data/faces. '
                                     'With PATHs, show what each holds: the detected format, images per class and '
                                     'split, and what was skipped and why; or, for an unlabeled pool, its size and '
                                     'how many of its files open as images.')
    parser.add_argument('paths', nargs='*', metavar='PATH', help='labeled set roots, CSV files or unlabeled pools')
    parser.add_argument('--format', choices=formats.FORMATS, help='labeled format (default: detected from each PATH)')
    parser.add_argument('--check-all', action='store_true',
                        help=f'read every image of an unlabeled pool, however large (default: pools up to '
                             f'{CHECK_UP_TO} images)')
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                        help='processes reading a pool (default: the cores, at most 8)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')
    args = parser.parse_args()
    if not args.paths:
        faces.default_data()
    else:
        found = [describe(path, args.format, args.check_all, args.workers) for path in args.paths]
        if args.json:
            print(json.dumps(found, indent=1))
        else:
            for f in found:  # a path that cannot be read: its one line on stderr
                print(describe_text(f), file=sys.stderr if 'error' in f else sys.stdout)
        # exit status 1 when a path or a split could not be read, for scripts
        sys.exit(any('error' in f or any('error' in s for s in f.get('splits', {}).values()) for f in found))


if __name__ == '__main__':
    main()
