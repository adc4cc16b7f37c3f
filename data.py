"""
Data: labeled and unlabeled datasets, weak and strong augmentation, samplers, and the built-in face data.

Labeled sets are read from the files their owners ship (Aff-Wild2/ABAW, RAF-DB, FER2013, AffectNet) or from the
ImageFolder layout ROOT/{train,val,test}/<class>/*.jpg; the format is detected from what is in the path. An unlabeled
pool is a folder tree of images, an InsightFace RecordIO pair (train.rec + train.idx) or a labeled set's train split
(open_pool). `python data.py` generates the built-in procedural face-expression set into
./data/faces; `python data.py PATH [PATH ...] [--json]` shows what a dataset holds (format, images per class and
split, what was skipped and why).
"""
import argparse
import array
import bisect
import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import random
import struct
import sys
import time
from collections import Counter

import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.gif', '.ppm', '.pgm')
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# -----------------------------------------------------------------------------
# images and augmentation


def to_rgb(image):
    """Grey, palette, CMYK, 16-bit and RGBA images all become 8-bit RGB (alpha composited on black)."""
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):  # 16-bit grey: keep the high byte
        image = image.convert('I').point(lambda v: v * (1 / 256)).convert('L')
    if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in image.info:
        # convert('RGB') would keep whatever colour hides under transparent pixels; compositing makes it black
        image = Image.alpha_composite(Image.new('RGBA', image.size, (0, 0, 0, 255)), image.convert('RGBA'))
    return image.convert('RGB')


def open_image(source):
    """Load one image source as an RGB PIL image: a file path, (path, (x, y, w, h)) to crop a face box, or the
    bytes of a square grey image (FER2013's 48x48 pixels)."""
    if isinstance(source, bytes):
        side = math.isqrt(len(source))
        return Image.frombytes('L', (side, side), source).convert('RGB')
    path, box = (source, None) if isinstance(source, str) else source
    with Image.open(path) as image:
        image = to_rgb(image)
    if box is not None:
        x, y, w, h = box
        image = image.crop((x, y, x + w, y + h))
    return image


class Augment:
    """decode -> uint8 tensor at img_size, then the weak view (flip + translate) and, for unlabeled images, the
    strong view (weak + RandAugment + Cutout). Both views are made from one decode."""

    def __init__(self, img_size):
        self.resize = v2.Resize((img_size, img_size), antialias=True)
        self.weak = v2.Compose([v2.RandomHorizontalFlip(),
                                v2.RandomCrop(img_size, padding=img_size // 8, padding_mode='reflect')])
        self.randaugment = v2.RandAugment(num_ops=2, magnitude=10)
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        self.cutout = v2.RandomErasing(p=1.0, scale=(0.02, 0.15), value=0)

    def decode(self, image):
        image = v2.functional.pil_to_tensor(image)
        return image if list(image.shape[-2:]) == list(self.resize.size) else self.resize(image)

    def eval_view(self, image):
        return self.normalize(self.decode(image))

    def weak_view(self, image):
        return self.normalize(self.weak(self.decode(image)))

    def two_views(self, image):
        image = self.decode(image)
        weak = self.weak(image)
        strong = self.cutout(self.normalize(self.randaugment(self.weak(image))))
        return self.normalize(weak), strong


# -----------------------------------------------------------------------------
# datasets


def seeded(key):
    """Keys from InfiniteSampler are (index, seed): the augmentation of a sample is a function of its position
    in the stream, whatever worker draws it, so a resumed run sees exactly the images it would have seen."""
    if isinstance(key, tuple):
        index, seed = key
        torch.manual_seed(seed)
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
            return open_image(self.items[index])
        except (OSError, ValueError) as error:
            raise RuntimeError(f'{self.name}: cannot read image {self.items[index]}: {error}') from None

    def __getitem__(self, key):
        with torch.random.fork_rng(devices=[]):
            index = seeded(key)
            return self.view(self.read(index)), self.labels[index]


# -----------------------------------------------------------------------------
# labeled sets, read from the files their owners ship. Each set keeps its class names in its own order (they
# travel in the checkpoint). Bad input is an error naming the file and line; only what a format documents as
# "no label" (Aff-Wild2's -1 and frames without a face, AffectNet's 8..10) is skipped, and counted.

AFFWILD2_CLASSES = ('Neutral', 'Anger', 'Disgust', 'Fear', 'Happiness', 'Sadness', 'Surprise', 'Other')
RAFDB_CLASSES = ('Surprise', 'Fear', 'Disgust', 'Happiness', 'Sadness', 'Anger', 'Neutral')  # labels 1..7
FER2013_CLASSES = ('Angry', 'Disgust', 'Fear', 'Happy', 'Sad', 'Surprise', 'Neutral')
FER2013_FILES = ('fer2013.csv', 'icml_face_data.csv')
AFFECTNET_CLASSES = ('Neutral', 'Happy', 'Sad', 'Surprise', 'Fear', 'Disgust', 'Anger', 'Contempt')
AFFECTNET_DROPPED = {7: 'Contempt, 7-class protocol', 8: 'None', 9: 'Uncertain', 10: 'Non-Face'}
AFFECTNET_COLUMNS = ('subDirectory_filePath', 'face_x', 'face_y', 'face_width', 'face_height', 'facial_landmarks',
                     'expression', 'valence', 'arousal')
# folders find() never enters: the image folders of these formats hold up to millions of files
IMAGE_FOLDERS = {'cropped_aligned', 'Manually_Annotated_Images', 'Image'}


def bad(path, line, message):
    return ValueError(f'{path}, line {line}: {message}')


def parse_int(text, path, line, low, high, what='label'):
    try:
        value = int(text)
    except ValueError:
        raise bad(path, line, f'malformed {what} {text!r}, expected an integer {low}..{high}') from None
    if not low <= value <= high:
        raise bad(path, line, f'{what} {value} out of range {low}..{high}')
    return value


def read_lines(path, header=None):
    """[(line number, text)] of a text annotation file after its header line, which must equal `header`."""
    with open(path, errors='replace') as f:  # undecodable bytes then fail as a malformed line, with its number
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if header is not None and (not lines or lines[0].strip() != header):
        raise bad(path, 1, f'header {lines[0] if lines else ""!r}, expected {header!r}')
    start = 0 if header is None else 1
    return [(n, text.strip()) for n, text in enumerate(lines[start:], start + 1)]


def find(root, names, depth=4):
    """Paths of the files and folders called one of `names` in the first `depth` levels under root, shallowest
    first. Image folders and folders of over 200 entries are not entered: finding stays fast beside millions of
    images."""
    found, level = [], [root]
    for _ in range(depth):
        deeper = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:  # a file, or a folder we may not read
                continue
            for entry in entries:
                if entry.name in names:
                    found.append(entry.path)
                elif len(entries) <= 200 and entry.name not in IMAGE_FOLDERS and entry.is_dir():
                    deeper.append(entry.path)
        level = deeper
    return found


def first(paths, root, what):
    if not paths:
        raise FileNotFoundError(f'{root}: no {what} found')
    return paths[0]


def existing(path, line, *candidates):
    """The first image file of candidates that exists, checked at load time so a missing one names its line."""
    for candidate in candidates:
        if os.path.exists(candidate):
            return candidate
    raise bad(path, line, f'image not found: {" or ".join(candidates)}')


def pick(split, choices, fmt):
    if split not in choices:
        raise ValueError(f'{fmt} has the splits {", ".join(choices)}, not {split!r}')
    return choices[split]


def labeled_set(items, labels, classes, where, split, skipped=None):
    if not items:
        raise ValueError(f'empty {split!r} split: no labeled images in {where}' +
                         (f' (skipped: {dict(skipped)})' if skipped else ''))
    return LabeledSet(items, labels, list(classes), where, dict(skipped or {}))


def find_affwild2(root):
    """(annotation folder holding Train_Set/ and Validation_Set/, cropped_aligned/ folder) under root, None where
    absent. The annotation folder may be nested (Annotations/EXPR_Recognition_Challenge/, EXPR_Set/, ...); the AU
    and VA tracks ship Train_Set/ folders too, so the expression one is told by its folder's name or its header."""
    def expression_set(folder):
        if 'EXPR' in os.path.basename(os.path.dirname(folder)).upper():
            return True
        files = sorted(f for f in os.listdir(folder) if f.endswith('.txt'))
        return bool(files) and read_lines(os.path.join(folder, files[0]))[:1] == [(1, ','.join(AFFWILD2_CLASSES))]
    found = find(root, ('Train_Set', 'Validation_Set', 'cropped_aligned'))
    sets = [os.path.dirname(p) for p in found if not p.endswith('cropped_aligned') and expression_set(p)]
    frames = [p for p in found if p.endswith('cropped_aligned')]
    while frames and os.path.isdir(os.path.join(frames[0], 'cropped_aligned')):  # a zip unpacked into its own name
        frames[0] = os.path.join(frames[0], 'cropped_aligned')
    return (sets or [None])[0], (frames or [None])[0]


def read_affwild2(root, split):
    """Aff-Wild2, ABAW expression track: frame k of video v is line k + 1 of <Train_Set|Validation_Set>/v.txt and
    the image cropped_aligned/v/{k:05d}.jpg. Label -1 (ignore) and annotated frames without a face image are
    skipped and counted. Videos split into v_left / v_right are two videos, each with its own .txt and folder."""
    annotations, frames = find_affwild2(root)
    if annotations is None or frames is None:
        raise FileNotFoundError(f'{root}: no Aff-Wild2 layout (an annotation folder with Train_Set/ and '
                                f'Validation_Set/ of expression .txt files, and cropped_aligned/)')
    folder = os.path.join(annotations, pick(split, {'train': 'Train_Set', 'val': 'Validation_Set'}, 'Aff-Wild2'))
    items, labels, skipped = [], [], Counter()
    for file in sorted(f for f in os.listdir(folder) if f.endswith('.txt')) if os.path.isdir(folder) else []:
        path, video = os.path.join(folder, file), file[:-len('.txt')]
        faces = set(os.listdir(os.path.join(frames, video))) if os.path.isdir(os.path.join(frames, video)) else set()
        for line, text in read_lines(path, ','.join(AFFWILD2_CLASSES)):
            label, image = parse_int(text, path, line, -1, 7), f'{line - 1:05d}.jpg'
            if label == -1:
                skipped['label -1 (ignore)'] += 1
            elif image not in faces:
                skipped['annotated frame without a face image'] += 1
            else:
                items.append(os.path.join(frames, video, image))
                labels.append(label)
    return labeled_set(items, labels, AFFWILD2_CLASSES, folder, split, skipped)


def read_rafdb(root, split):
    """RAF-DB basic: EmoLabel/list_patition_label.txt lines `train_00001.jpg 5` (labels 1..7), images
    Image/aligned/train_00001_aligned.jpg, else Image/original/train_00001.jpg. RAF-DB has no validation split:
    train = the train_ images, and val and test are both the test_ images (the usual practice)."""
    prefix = pick(split, {'train': 'train_', 'val': 'test_', 'test': 'test_'}, 'RAF-DB')
    path = first(find(root, ('list_patition_label.txt',)), root, 'EmoLabel/list_patition_label.txt')
    base = os.path.dirname(os.path.dirname(path))
    items, labels = [], []
    for line, text in read_lines(path):
        fields = text.split()
        if len(fields) != 2 or not fields[0].startswith(('train_', 'test_')):
            raise bad(path, line, f'malformed line {text!r}, expected like "train_00001.jpg 5"')
        label = parse_int(fields[1], path, line, 1, 7) - 1
        if fields[0].startswith(prefix):
            stem = os.path.splitext(fields[0])[0]
            items.append(existing(path, line, os.path.join(base, 'Image', 'aligned', stem + '_aligned.jpg'),
                                  os.path.join(base, 'Image', 'original', fields[0])))
            labels.append(label)
    return labeled_set(items, labels, RAFDB_CLASSES, f'{path} ({prefix}* lines)', split)


def read_fer2013(root, split):
    """FER2013: fer2013.csv (header `emotion,pixels,Usage`) or its icml_face_data.csv variant (`emotion, Usage,
    pixels`); Usage Training / PublicTest / PrivateTest = train / val / test. Each face is kept as its 48x48 grey
    bytes (2.3 kB), which open_image decodes."""
    usage = pick(split, {'train': 'Training', 'val': 'PublicTest', 'test': 'PrivateTest'}, 'FER2013')
    path = root if os.path.isfile(root) else first(find(root, FER2013_FILES), root, ' or '.join(FER2013_FILES))
    items, labels = [], []
    with open(path, newline='', errors='replace') as f:
        rows = csv.reader(f)
        header = [name.strip() for name in next(rows, [])]
        if sorted(header) != ['Usage', 'emotion', 'pixels']:
            raise bad(path, 1, f'header {",".join(header)!r}, expected emotion,pixels,Usage')
        for line, row in enumerate(rows, 2):
            if len(row) != 3:
                raise bad(path, line, f'{len(row)} fields, expected 3')
            row = dict(zip(header, row))
            label = parse_int(row['emotion'], path, line, 0, 6)
            if row['Usage'].strip() not in ('Training', 'PublicTest', 'PrivateTest'):
                raise bad(path, line, f'Usage {row["Usage"]!r}, expected Training, PublicTest or PrivateTest')
            if row['Usage'].strip() == usage:
                try:
                    pixels = bytes(map(int, row['pixels'].split()))
                except ValueError:  # not an integer, or outside 0..255
                    pixels = b''
                if len(pixels) != 48 * 48:
                    raise bad(path, line, 'pixels: expected 2304 space-separated integers 0..255')
                items.append(pixels)
                labels.append(label)
    return labeled_set(items, labels, FER2013_CLASSES, f'{path} (Usage {usage})', split)


def read_affectnet(root, split, contempt=True):
    """AffectNet: training.csv / validation.csv (train / val) and the image folder (Manually_Annotated_Images/,
    else the CSV's folder). Expressions 0..7 are kept, or 0..6 with contempt=False (the 7-class protocol); 8..10
    (None, Uncertain, Non-Face) are dropped and counted. Each face is cropped by its face_x/y/width/height box."""
    name = pick(split, {'train': 'training.csv', 'val': 'validation.csv'}, 'AffectNet')
    path = first(find(root, (name,)), root, name)
    images = (find(root, ('Manually_Annotated_Images',)) or [os.path.dirname(path)])[0]
    classes = AFFECTNET_CLASSES if contempt else AFFECTNET_CLASSES[:7]
    items, labels, skipped = [], [], Counter()
    with open(path, newline='', errors='replace') as f:
        rows = csv.reader(f)
        top = next(rows, [])
        header, start = [name.strip() for name in top], 2
        if len(top) == len(AFFECTNET_COLUMNS) and top[1].strip().isdigit():  # a copy without its header row
            header, start, rows = AFFECTNET_COLUMNS, 1, itertools.chain([top], rows)
        if not {'subDirectory_filePath', 'face_x', 'face_y', 'face_width', 'face_height', 'expression'} <= set(header):
            raise bad(path, 1, f'header {",".join(header)!r}, expected {",".join(AFFECTNET_COLUMNS)}')
        for line, row in enumerate(rows, start):
            if len(row) != len(header):
                raise bad(path, line, f'{len(row)} fields, expected {len(header)}')
            row = dict(zip(header, row))
            label = parse_int(row['expression'], path, line, 0, 10, 'expression')
            if label >= len(classes):
                skipped[f'expression {label} ({AFFECTNET_DROPPED[label]})'] += 1
                continue
            try:
                box = tuple(round(float(row[k])) for k in ('face_x', 'face_y', 'face_width', 'face_height'))
            except ValueError:
                raise bad(path, line, 'face_x, face_y, face_width and face_height must be numbers') from None
            items.append((existing(path, line, os.path.join(images, row['subDirectory_filePath'])), box))
            labels.append(label)
    return labeled_set(items, labels, classes, path, split, skipped)


def read_imagefolder(root, split):
    """ROOT/<split>/<class>/**/image, class names sorted."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'no {split!r} split: {folder} is not a folder')
    classes = sorted(d.name for d in os.scandir(folder) if d.is_dir())
    items, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(folder, name))):
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    items.append(os.path.join(dirpath, file))
                    labels.append(label)
    return labeled_set(items, labels, classes, f'{folder}/<class>/', split)


FORMATS = {'affwild2': read_affwild2, 'rafdb': read_rafdb, 'fer2013': read_fer2013, 'affectnet': read_affectnet,
           'affectnet7': lambda root, split: read_affectnet(root, split, contempt=False),
           'imagefolder': read_imagefolder}
SPLITS = {'affwild2': ('train', 'val'), 'rafdb': ('train', 'test'), 'fer2013': ('train', 'val', 'test'),
          'affectnet': ('train', 'val'), 'affectnet7': ('train', 'val'), 'imagefolder': ('train', 'val', 'test')}


def detect_format(path):
    """The format of the labeled set at path, from the files in it: a key of FORMATS."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: no such file or folder')
    if os.path.isfile(path):
        with open(path, errors='replace') as f:
            header = f.readline(1000).replace(' ', '').strip().split(',')
        if sorted(header) == ['Usage', 'emotion', 'pixels'] or os.path.basename(path) in FER2013_FILES:
            return 'fer2013'
    elif any(os.path.isdir(os.path.join(path, split)) for split in ('train', 'val', 'test')):
        return 'imagefolder'
    elif os.path.isdir(path):
        found = {os.path.basename(p) for p in find(path, ('list_patition_label.txt', 'training.csv',
                                                          'validation.csv', *FER2013_FILES))}
        if 'list_patition_label.txt' in found:
            return 'rafdb'
        if found & set(FER2013_FILES):
            return 'fer2013'
        if found & {'training.csv', 'validation.csv'}:
            return 'affectnet'
        if None not in find_affwild2(path):
            return 'affwild2'
    raise ValueError(f'{path}: unknown dataset format (looked for train/ val/ test/ class folders, '
                     f'EmoLabel/list_patition_label.txt, fer2013.csv, training.csv, Train_Set/ with cropped_aligned/); '
                     f'pass --format, one of {", ".join(FORMATS)}')


def load_labeled(root, split, fmt=None):
    """The `split` ('train', 'val' or 'test') of the labeled set at root as a LabeledSet; fmt (a key of FORMATS)
    is detected from root when None."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}: one of {", ".join(FORMATS)}')
    return FORMATS[fmt or detect_format(root)](root, split)


# -----------------------------------------------------------------------------
# unlabeled pools, samplers and loaders


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
    labeled = load_labeled(path, split, fmt)
    return ListPool(labeled.items, labeled.name)


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

    def __init__(self, items, where='list'):
        self.items, self.where = items, where

    def __len__(self):
        return len(self.items)

    def read(self, i):
        return open_image(self.items[i])

    def name(self, i):
        item = self.items[i]
        return f'{self.where}: image {i}' if isinstance(item, bytes) else str(item)  # FER2013 pixels: no dump


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


def loader(dataset, batch_size, sampler=None, workers=2, pin_memory=False):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=sampler is not None, persistent_workers=workers > 0 and sampler is not None,
                      prefetch_factor=4 if workers > 0 else None)


# -----------------------------------------------------------------------------
# the built-in data: procedurally drawn faces whose brows, eyes and mouth encode the expression (FACS action units)

CLASSES = ('Neutral', 'Anger', 'Disgust', 'Fear', 'Happiness', 'Sadness', 'Surprise', 'Other')  # ABAW order
# action units per class: brow raise (AU1+2), inner brow raise (AU1), brow lower (AU4), lids up (AU5),
# lids tight (AU7), cheek raise (AU6), lip corners up (AU12), down (AU15), jaw drop (AU26), lip stretch (AU20),
# lip press (AU23/24), nose wrinkle + upper lip raise (AU9/10)
AUS = ('brows_up', 'inner', 'lower', 'lids_up', 'lids_tight', 'cheek', 'smile', 'frown', 'jaw', 'stretch', 'press',
       'wrinkle')
PROTOTYPES = {
    'Neutral': {},
    'Anger': dict(lower=1.0, lids_up=0.4, lids_tight=0.8, press=1.0),
    'Disgust': dict(wrinkle=1.0, frown=0.7, lower=0.3),
    'Fear': dict(brows_up=0.9, lower=0.6, lids_up=1.0, stretch=1.0, jaw=0.5),
    'Happiness': dict(cheek=1.0, smile=1.0),
    'Sadness': dict(inner=1.0, lower=0.4, frown=1.0, lids_tight=0.3),
    'Surprise': dict(brows_up=1.0, lids_up=1.0, jaw=1.0),
}
# class mix of the splits: imbalanced labeled/val sets like real FER data, and an unlabeled pool dominated by
# neutral and happy faces, like face-recognition photos
LABELED_MIX = (0.26, 0.08, 0.04, 0.04, 0.20, 0.12, 0.10, 0.16)
UNLABELED_MIX = (0.45, 0.04, 0.02, 0.02, 0.30, 0.05, 0.05, 0.07)


def expression(label, rng):
    """Action-unit intensities for one face of class `label`: the prototype at a random intensity, plus noise.
    Other = a partial mixture of two expressions."""
    name = CLASSES[label]
    if name == 'Other':
        a, b = rng.sample([c for c in PROTOTYPES if c != 'Neutral'], 2)
        units = {u: 0.55 * rng.uniform(0.4, 1.0) * (PROTOTYPES[a].get(u, 0) + PROTOTYPES[b].get(u, 0)) for u in AUS}
    else:
        intensity = rng.uniform(0.35, 1.0)
        units = {u: intensity * PROTOTYPES[name].get(u, 0.0) for u in AUS}
    return {u: max(0.0, v + rng.gauss(0, 0.12)) for u, v in units.items()}


def new_identity(rng):
    """A person: face shape, colours and a resting face (some people look a little sad or surprised at rest)."""
    tone = rng.uniform(0.35, 1.0)
    return dict(skin=(int(120 + 120 * tone), int(80 + 110 * tone), int(60 + 100 * tone)),
                hair=tuple(rng.randint(10, 120) for _ in range(3)), hair_size=rng.uniform(0.05, 0.35),
                width=rng.uniform(0.56, 0.70), height=rng.uniform(0.72, 0.86), eye_y=rng.uniform(0.40, 0.47),
                eye_gap=rng.uniform(0.15, 0.21), eye_size=rng.uniform(0.045, 0.065), mouth_y=rng.uniform(0.70, 0.76),
                mouth_w=rng.uniform(0.12, 0.18), brow_w=rng.uniform(1.5, 3.0),
                rest={u: max(0.0, rng.gauss(0, 0.15)) for u in AUS})


def draw_face(person, units, rng, size=48):
    S = 2 * size  # draw at twice the size, then downsample with antialiasing
    u = {k: v + person['rest'][k] for k, v in units.items()}
    background = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new('RGB', (S, S), background)
    d = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, 4)):  # background clutter
        x, y = rng.uniform(0, S), rng.uniform(0, S)
        d.rectangle((x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    cx, cy, w, h = S / 2, S / 2, person['width'] * S, person['height'] * S
    d.ellipse((cx - w / 2, cy - h / 2 - S * person['hair_size'] * 0.4, cx + w / 2, cy + h / 4), fill=person['hair'])
    d.ellipse((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=person['skin'])
    dark = tuple(max(0, c - 110) for c in person['skin'])
    ey, gap, er = person['eye_y'] * S, person['eye_gap'] * S, person['eye_size'] * S
    openness = max(0.15, 1 + 0.8 * u['lids_up'] - 0.6 * u['lids_tight'] - 0.5 * u['cheek'])
    for side in (-1, 1):
        ex = cx + side * gap
        d.ellipse((ex - er * 1.3, ey - er * openness, ex + er * 1.3, ey + er * openness), fill=(250, 250, 250))
        pr = min(er * 0.7, er * openness)
        d.ellipse((ex - pr, ey - pr, ex + pr, ey + pr), fill=(30, 20, 20))
        if u['cheek'] > 0.3:  # AU6 cheek raiser: crow's feet and raised lower lids
            d.arc((ex - er * 1.6, ey - er, ex + er * 1.6, ey + er * 1.8), 20, 160, fill=dark, width=2)
        # brows: height from AU1+2 and AU4, inner end raised by AU1 and lowered/pulled in by AU4
        by = ey - er * 2.2 - S * 0.05 * u['brows_up'] + S * 0.035 * u['lower']
        inner = by - S * 0.05 * u['inner'] + S * 0.04 * u['lower']
        outer = by + S * 0.015 * u['inner']
        ix = cx + side * (gap * 0.45 - S * 0.02 * u['lower'])
        d.line((ix, inner, cx + side * (gap + er * 1.8), outer), fill=person['hair'], width=int(person['brow_w'] * 2))
    if u['wrinkle'] > 0.25:  # AU9 nose wrinkler
        for k in range(3):
            y = ey + er * 1.3 + k * 3
            d.line((cx - 5, y, cx + 5, y + 1), fill=dark, width=1)
    d.line((cx, ey + er, cx - 3, S * (person['mouth_y'] - 0.09)), fill=dark, width=2)
    # mouth: corners up (AU12) or down (AU15), width stretched (AU20) or pressed (AU23), jaw drop opens it (AU26)
    my, mw = person['mouth_y'] * S - S * 0.02 * u['wrinkle'], person['mouth_w'] * S * (1 + 0.45 * u['stretch'] + 0.25 * u['smile'] - 0.35 * u['press'])
    curve = S * (0.06 * u['smile'] - 0.05 * u['frown'])
    opening = S * (0.10 * u['jaw'] + 0.03 * u['stretch'])
    lips = (150, 50, 60) if u['press'] < 0.5 else (120, 60, 60)
    top = [(cx + mw * t, my - curve * t * t - S * 0.015 * u['wrinkle'] * (1 - t * t)) for t in (-1, -0.5, 0, 0.5, 1)]
    bottom = [(x, y + opening * (1 - ((x - cx) / mw) ** 2)) for x, y in reversed(top)]
    d.polygon(top + bottom, fill=(60, 15, 20) if opening > 2 else lips, outline=lips)
    d.line(top, fill=lips, width=max(1, int(3 - 2 * u['press'])))
    # pose, lighting, occlusion, blur and noise
    image = image.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, translate=(rng.uniform(-5, 5), rng.uniform(-5, 5)),
                         fillcolor=background)
    zoom = rng.uniform(0.9, 1.15)
    crop = S / zoom
    image = image.crop(((S - crop) / 2, (S - crop) / 2, (S + crop) / 2, (S + crop) / 2)).resize((S, S))
    if rng.random() < 0.25:
        d = ImageDraw.Draw(image)
        x, y = rng.uniform(0, S * 0.8), rng.uniform(S * 0.3, S * 0.9)
        d.ellipse((x, y, x + rng.uniform(15, 40), y + rng.uniform(15, 40)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    light = Image.linear_gradient('L').rotate(rng.uniform(0, 360)).resize((S, S))
    image = Image.composite(image, Image.eval(image, lambda v: int(v * rng.uniform(0.3, 0.7))), light.point(lambda v: 255 - v // 2))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2))).resize((size, size), Image.LANCZOS)
    generator = torch.Generator().manual_seed(rng.getrandbits(63))  # sensor noise, reproducible from the seed
    noise = (128 + rng.uniform(2, 15) * torch.randn(size * size, generator=generator)).clamp(0, 255).byte()
    return Image.blend(image, Image.frombytes('L', (size, size), bytes(noise.tolist())).convert('RGB'), 0.08)


def split_counts(shares, total):
    """Whole counts in proportion to shares that sum to total (largest remainder)."""
    counts = [int(share * total) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda c: counts[c] - shares[c] * total)
    for c in by_remainder[:total - sum(counts)]:
        counts[c] += 1
    return counts


def generate_faces(root, counts=(1000, 1000, 10000), identities=(60, 60, 600), seed=0):
    """Write the built-in set: ROOT/train (labeled), ROOT/val and ROOT/unlabeled/<class>/ (the unlabeled pool;
    its class folders are only for inspection, the loader ignores them). Each split has its own people.
    Written to a temporary folder and renamed, so an interrupted generation is never mistaken for a finished one."""
    rng = random.Random(seed)
    tmp = root + '.tmp'
    for split, count, people, mix in zip(('train', 'val', 'unlabeled'), counts, identities,
                                         (LABELED_MIX, LABELED_MIX, UNLABELED_MIX)):
        persons = [new_identity(rng) for _ in range(people)]
        labels = [c for c, n in enumerate(split_counts(mix, count)) for _ in range(n)]
        for c in CLASSES:
            os.makedirs(os.path.join(tmp, split, c), exist_ok=True)
        for i, label in enumerate(labels):
            image = draw_face(rng.choice(persons), expression(label, rng), rng)
            image.save(os.path.join(tmp, split, CLASSES[label], f'{split}_{i:05d}.png'))
    os.replace(tmp, root)


def default_data(root='data/faces'):
    if not os.path.isdir(root):
        print(f'generating the built-in face-expression set into {root} (once) ...')
        generate_faces(root)
    return root


# -----------------------------------------------------------------------------
# python data.py PATH [PATH ...] [--json]: what a dataset holds, before training on it


def describe(path, fmt=None):
    """A dict of what path holds: the labeled format and, per split, images per class and what was skipped and
    why; or, for a path in no labeled format, the size of the unlabeled pool it is."""
    try:
        fmt = fmt or detect_format(path)
    except (OSError, ValueError) as error:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # indexing a folder pool reports on stdout: keep --json clean
                return dict(path=path, format='unlabeled', images=len(open_pool(path)))
        except (OSError, ValueError):
            return dict(path=path, error=str(error))
    splits = {}
    for split in SPLITS[fmt]:
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
    parser.add_argument('--format', choices=FORMATS, help='labeled format (default: detected from each PATH)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')
    args = parser.parse_args()
    if not args.paths:
        default_data()
    else:
        found = [describe(path, args.format) for path in args.paths]
        print(json.dumps(found, indent=1) if args.json else '\n'.join(map(describe_text, found)))
        # exit status 1 when a path or a split could not be read, for scripts
        sys.exit(any('error' in f or any('error' in s for s in f.get('splits', {}).values()) for f in found))
