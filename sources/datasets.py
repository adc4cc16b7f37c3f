"""
The labeled set and the unlabeled pool as torch Datasets of uint8 images: what the loader workers read and decode.
"""
import bisect
import itertools
import sys

from torch.utils.data import Dataset

from sources import formats


class UnreadableImage(RuntimeError):
    """Images a run cannot do without cannot be read. Raised in a loader worker, it reaches the training process
    raised again by the DataLoader, the worker's traceback before its message: str() gives the message alone."""

    def __str__(self):
        text, raised_as = super().__str__(), f'{type(self).__module__}.{type(self).__qualname__}: '
        if 'Original Traceback' not in text or raised_as not in text:
            return text
        return text[text.rfind(raised_as) + len(raised_as):].strip()  # after the traceback's 'module.UnreadableImage: '


class LabeledSet(Dataset):
    """items[i] is an image source for open_image, labels[i] its class index into classes. Returns (uint8 image,
    label)."""

    def __init__(self, items, labels, classes, name, skipped=None):
        self.items, self.labels, self.classes, self.name = items, labels, classes, name
        self.skipped = skipped or {}  # reason -> count, for tools/inspect_data.py and the logs
        self.decode = None  # set by the user of the set: a Decode

    def __len__(self):
        return len(self.items)

    def read(self, index):
        try:
            return formats.open_image(self.items[index])
        except (OSError, ValueError) as error:
            raise UnreadableImage(f'{self.name}: cannot read image {self.items[index]}: {error}; a labeled set needs '
                                  'every image: replace or remove it') from None

    def __getitem__(self, index):
        return self.decode(self.read(index)), self.labels[index]


def load_labeled(root, split, fmt=None):
    """The `split` ('train', 'val' or 'test') of the labeled set at root, in any format formats.py reads."""
    return LabeledSet(**formats.read_labeled(root, split, fmt))


class UnlabeledPool(Dataset):
    """The pools of one or more --unlabeled sources (open_pool) under one global index, so per-image state
    (FlexMatch's memory) has one slot per image. Returns (uint8 image, index, skipped). An unreadable, truncated or
    non-image file is replaced by the next readable one and counted in `skipped`, so one bad file in a million never
    stops training."""

    def __init__(self, sources, decode):
        self.sources, self.decode = list(sources), decode
        self.ends = list(itertools.accumulate(len(s) for s in self.sources))  # source k: [ends[k-1], ends[k])

    def __len__(self):
        return self.ends[-1] if self.ends else 0

    def locate(self, i):
        k = bisect.bisect_right(self.ends, i)
        return self.sources[k], i - (self.ends[k - 1] if k else 0)

    def read(self, i):
        """Image i decoded, or None (with a warning) when its file is not a readable image."""
        source, j = self.locate(i)
        try:
            return self.decode(source.read(j))
        except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, EOFError... on bad files
            print(f'warning: skipping unreadable image {source.name(j)}: {error}', file=sys.stderr)
            return None

    def __getitem__(self, index):
        for skipped in range(100):
            i = (index + skipped) % len(self)
            image = self.read(i)
            if image is not None:
                return image, i, skipped
        source, j = self.locate(index)
        raise UnreadableImage(f'100 unreadable images in a row in the unlabeled pool, from {source.name(j)}')
