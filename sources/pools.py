"""
Unlabeled pools: where the unlabeled faces come from. open_pool(path) gives a folder tree of images (FolderPool,
with a compact cached index), an InsightFace RecordIO pair (RecordPool, read without MXNet) or a labeled set's
train split with the labels ignored (ListPool). Every pool has len(pool), pool.read(i) -> RGB PIL image and
pool.name(i) for messages; data.UnlabeledPool joins them and makes the two augmented views.
"""
import array
import csv
import hashlib
import io
import os
import struct
import time

import torch
from PIL import Image

from sources.formats import IMAGE_EXTENSIONS, canonical_class, detect_format, open_image, read_labeled, to_rgb

def scan_images(root):
    """All image files under root, recursively, in a stable order."""
    paths = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        paths.extend(os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ValueError(f'unlabeled pool {root}: no image files found')
    return paths


def open_pool(path, split='train', reindex=False):
    """The unlabeled images at path, as a pool: len(pool), pool.read(i) -> RGB image, pool.name(i) for messages.
    A .rec file, or a folder holding train.rec + train.idx, is an InsightFace RecordIO pair (MS1M, Glint, WebFace);
    a labeled set (any format detect_format knows) gives its `split` with the labels ignored, never its val or
    test images; anything else is a folder tree of images (FolderPool). Folder and RecordIO indexes are cached;
    reindex=True rebuilds them (cached_index)."""
    if path.endswith('.rec') or os.path.isfile(os.path.join(path, 'train.rec')):
        return RecordPool(path, reindex)
    try:
        fmt = detect_format(path)
    except ValueError:  # no labeled format: a plain folder of images
        return FolderPool(path, reindex)
    labeled = read_labeled(path, split, fmt)
    return ListPool(labeled['items'], labeled['name'], labeled['labels'], labeled['classes'])


def true_labels(sources, classes, labels_csv=None):
    """The true class (an index into `classes`, matched by name with canonical_class) of every image of the pools,
    -1 where unknown; None when no image has one. A labeled set used as a pool carries its labels; labels_csv (lines
    `file name,class`, a header allowed) labels the images of folder pools by file name. Only for measuring how often
    pseudo-labels are right: training never sees them."""
    index = {canonical_class(name): i for i, name in enumerate(classes)}
    by_name = {name: index.get(canonical_class(label), -1) for name, label in read_pool_labels(labels_csv)}
    truth = []
    for source in sources:
        if getattr(source, 'labels', None) is not None:
            to_ours = [index.get(canonical_class(name), -1) for name in source.classes]
            truth += [to_ours[label] for label in source.labels]
        elif isinstance(source, FolderPool) and by_name:
            truth += [by_name.get(os.path.basename(source.path(i)), -1) for i in range(len(source))]
        else:
            truth += [-1] * len(source)
    return torch.tensor(truth) if any(t >= 0 for t in truth) else None


def read_pool_labels(path, flag='--pool-labels'):
    """[(file name, class name)] from a CSV of `file name,class` lines (none for no path). Whatever the bytes, what
    cannot be read ends in one ValueError naming the flag, the file and the line."""
    if not path:
        return []
    rows = []
    try:
        with open(path, newline='', errors='replace') as f:  # undecodable bytes fail as a malformed line
            for line, row in enumerate(csv.reader(f), 1):
                if len(row) != 2 or '\ufffd' in ''.join(row):
                    shown = ','.join(row)[:60]
                    raise ValueError(f'{flag}: {path}, line {line}: expected "file name,class" text, got {shown!r}')
                rows.append((os.path.basename(row[0]), row[1]))
    except csv.Error as error:  # a NUL byte, an unclosed quote
        raise ValueError(f'{flag}: {path}, line {line + 1}: not a CSV of "file name,class" lines ({error})') from None
    return rows


INDEX_FILE, INDEX_VERSION = '.dtm_index.pt', 1
IMAGE_SUFFIXES = tuple(e.encode() for e in IMAGE_EXTENSIONS)


def cached_index(source, build, reindex=False):
    """build(source) -> dict of tensors, built once and cached: walking millions of files or parsing a
    multi-million-line .idx costs seconds to minutes, loading the cache a fraction of a second. The cache is
    SOURCE/.dtm_index.pt for a folder, .NAME.dtm_index.pt beside a file, or ~/.cache/dtm/ where those cannot be
    written. Like make, it is rebuilt when source is newer than it, or with reindex=True."""
    caches = [os.path.join(source, INDEX_FILE) if os.path.isdir(source) else
              os.path.join(os.path.dirname(source), '.' + os.path.basename(source) + INDEX_FILE),
              os.path.join(os.path.expanduser('~'), '.cache', 'dtm',
                           hashlib.sha1(os.fsencode(os.path.abspath(source))).hexdigest()[:16] + '.pt')]
    for cache in [] if reindex else caches:
        index = load_index(cache, source)
        if index is not None:
            return index
    t0 = time.time()
    index = dict(build(source), version=INDEX_VERSION)
    saved = next(filter(None, (save_index(index, cache) for cache in caches)), None)
    print(f'indexed {source} in {time.time() - t0:.1f}s; ' + (f'index cached in {saved}' if saved else
          'the index could not be cached (read-only)'))
    return index


def load_index(cache, source):
    """The cached index, or None when there is none, it is older than source, or it cannot be read."""
    try:
        if os.stat(cache).st_mtime_ns < os.stat(source).st_mtime_ns:
            return None
        index = torch.load(cache, weights_only=True)
        return index if index.get('version') == INDEX_VERSION else None
    except Exception:  # missing, truncated, from another torch: rebuilt
        return None


def save_index(index, cache):
    """Write to a temporary file and rename (ranks that index at once never see half a file), then touch it: the
    rename changed the folder's mtime when the cache lives in it. Returns the path, or None where it cannot write."""
    try:
        os.makedirs(os.path.dirname(cache) or '.', exist_ok=True)
        tmp = f'{cache}.{os.getpid()}.tmp'
        torch.save(index, tmp)
        os.replace(tmp, cache)
        os.utime(cache)
        return cache
    except OSError:
        return None


class FolderPool:
    """Every image file under root, recursively, in sorted path order. The index holds the relative paths as bytes
    joined into one uint8 tensor, plus an int64 tensor of where each ends: 8 bytes + the path's length per image
    (about 25 for MS1M's id/n.jpg), no Python object per image, shared copy-on-write by forked DataLoader workers.
    It is cached (cached_index) in ROOT/.dtm_index.pt, and rebuilt when root is newer than the cache, that is when
    an entry of root itself (an identity folder, a file of a flat pool) was added, removed or renamed. Files added
    inside existing subfolders are not noticed: pass reindex=True or delete the cache. A file removed since is
    skipped and counted when read, like any unreadable image."""

    def __init__(self, root, reindex=False):
        self.root = root
        index = cached_index(root, index_folder, reindex)
        self.names, self.ends = index['names'], index['ends']

    def __len__(self):
        return len(self.ends) - 1

    def path(self, i):
        start, end = self.ends[i:i + 2].tolist()
        return os.path.join(self.root, os.fsdecode(bytes(self.names[start:end].tolist())))

    def read(self, i):
        return open_image(self.path(i))

    def name(self, i):
        return self.path(i)


def index_folder(root):
    """{'names', 'ends'}: the image paths under root relative to it, in sorted order. Folder symlinks are not
    followed (as os.walk), so a link loop cannot hang it; names stay bytes, so any file name survives."""
    names, ends = bytearray(), array.array('q', [0])

    def walk(folder, prefix):
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path, prefix + entry.name + b'/')
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                names.extend(prefix + entry.name)
                ends.append(len(names))
    walk(os.fsencode(root), b'')
    if len(ends) == 1:
        raise ValueError(f'unlabeled pool {root}: no image files found')
    return dict(names=torch.frombuffer(names, dtype=torch.uint8).clone(),
                ends=torch.frombuffer(ends, dtype=torch.int64).clone())


RECORD_MAGIC = 0xced7230a


class RecordPool:
    """The images of an MXNet RecordIO pair as InsightFace ships MS1M/Glint/WebFace (train.rec + train.idx), read
    with struct and Pillow, no MXNet. A record is uint32 magic, uint32 (continuation flag << 29 | length), then the
    payload padded to 4 bytes; the payload is a header '<IfQQ' (flag, label, id, id2), `flag` float32 labels when
    flag > 0, then the encoded image. When record 0 is a header (flag > 0 and no image) its labels give the image
    records [1, label[0]); the records after them are identity ranges, not images. Otherwise every record is one.
    The pool holds two int64 tensors (record keys, byte offsets: 16 bytes per image), cached like a folder's index
    (parsing 5M .idx lines takes ~10 s), and opens the .rec lazily once per process, since DataLoader workers fork
    and must not share one file position."""

    def __init__(self, path, reindex=False):
        self.rec = path if path.endswith('.rec') else os.path.join(path, 'train.rec')
        self.file, self.pid = None, None
        index = cached_index(self.rec[:-4] + '.idx', self.index_records, reindex)
        self.keys, self.offsets = index['keys'], index['offsets']

    def index_records(self, idx):
        """{'keys', 'offsets'} of the image records, from the .idx lines `key<TAB>byte offset`."""
        with open(idx, 'rb') as f:
            try:
                numbers = array.array('q', map(int, f.read().split()))
            except ValueError:
                numbers = None
        if not numbers or len(numbers) % 2:
            raise ValueError(f'{idx}: expected lines of "index<TAB>byte offset"')
        keys, offsets = torch.frombuffer(numbers, dtype=torch.int64).view(-1, 2).unbind(1)
        keys, order = keys.sort()
        offsets = offsets[order]
        if offsets.max() >= os.path.getsize(self.rec):
            raise ValueError(f'{idx} points past the end of {self.rec}: not its index')
        if keys[0] == 0:
            labels, image = unpack_record(self.payload(offsets[0].item()))
            if labels and not image:  # InsightFace's header record
                images = (keys >= 1) & (keys < int(labels[0]))
                keys, offsets = keys[images], offsets[images]
        return dict(keys=keys, offsets=offsets)

    def __len__(self):
        return len(self.offsets)

    def payload(self, offset):
        """The payload of the record at offset. The writer splits a payload wherever the magic number falls on a
        4-byte boundary in it (continuation flags 1 first, 2 middle, 3 last) and drops it; joining puts it back."""
        if self.pid != os.getpid():  # first read in this process
            self.file, self.pid = open(self.rec, 'rb'), os.getpid()
        self.file.seek(offset)
        parts = []
        while True:
            head = self.file.read(8)
            magic, word = struct.unpack('<II', head) if len(head) == 8 else (None, 0)
            if magic != RECORD_MAGIC:
                raise ValueError(f'no record at byte {offset}: {self.rec} is damaged or the .idx does not match')
            continuation, length = word >> 29, word & (1 << 29) - 1
            parts.append(self.file.read(length + -length % 4)[:length])
            if len(parts[-1]) < length:
                raise ValueError(f'record at byte {offset} is cut short: {self.rec} is truncated')
            if continuation in (0, 3):
                return RECORD_MAGIC.to_bytes(4, 'little').join(parts)

    def read(self, i):
        _, image = unpack_record(self.payload(self.offsets[i].item()))
        with Image.open(io.BytesIO(image)) as image:
            return to_rgb(image)

    def name(self, i):
        return f'{self.rec} record {self.keys[i].item()}'

    def __getstate__(self):  # an open file does not pickle (spawned workers); each process opens its own
        return dict(self.__dict__, file=None, pid=None)


def unpack_record(payload):
    """(labels, image bytes) of a record payload: labels are the `flag` float32s after the header, or (label,)."""
    flag, label, _, _ = struct.unpack_from('<IfQQ', payload)
    labels = struct.unpack_from(f'<{flag}f', payload, 24)
    return labels or (label,), payload[24 + 4 * flag:]


class ListPool:
    """Images given as a list of open_image sources: file paths, or a labeled set's items with the labels ignored
    (e.g. AffectNet's train split as unlabeled data)."""

    def __init__(self, items, where='list', labels=None, classes=None):
        self.items, self.where, self.labels, self.classes = items, where, labels, classes  # labels: never trained on

    def __len__(self):
        return len(self.items)

    def read(self, i):
        return open_image(self.items[i])

    def name(self, i):
        item = self.items[i]
        return f'{self.where}: image {i}' if isinstance(item, bytes) else str(item)  # FER2013 pixels: no dump
