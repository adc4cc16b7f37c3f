"""
Labeled sets, read from the files their owners ship: Aff-Wild2 / ABAW expression track, RAF-DB basic, FER2013
(fer2013.csv, icml_face_data.csv), AffectNet (training.csv / validation.csv) and the ImageFolder layout
ROOT/{train,val,test}/<class>/. The format is detected from what is in the path (detect_format); read_labeled is the
one entry point. Each set keeps its class names in its own order (they travel in the checkpoint). Bad input is an
error naming the file and line; only what a format documents as "no label" (Aff-Wild2's -1 and frames without a
face, AffectNet's 8..10) is skipped, and counted.
"""
import csv
import itertools
import math
import os
from collections import Counter

from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.gif', '.ppm', '.pgm')

# the spellings of one expression across FER2013, RAF-DB, AffectNet and Aff-Wild2; other names match only themselves
SYNONYMS = {'angry': 'anger', 'disgusted': 'disgust', 'fearful': 'fear', 'afraid': 'fear', 'happy': 'happiness',
            'sad': 'sadness', 'surprised': 'surprise'}


def canonical_class(name):
    """One name per expression, whatever the data set calls it: 'Happy', 'happiness' -> 'happiness'."""
    return SYNONYMS.get(name.strip().lower(), name.strip().lower())


# -----------------------------------------------------------------------------
# images


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


# -----------------------------------------------------------------------------
# annotation files

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
    return dict(items=items, labels=labels, classes=list(classes), name=where, skipped=dict(skipped or {}))


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


def read_labeled(root, split, fmt=None):
    """The `split` ('train', 'val' or 'test') of the labeled set at root as a LabeledSet; fmt (a key of FORMATS)
    is detected from root when None. Returns a dict: items (open_image sources), labels, classes,
    name (where it was read) and skipped (reason -> count)."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f'unknown format {fmt!r}: one of {", ".join(FORMATS)}')
    return FORMATS[fmt or detect_format(root)](root, split)
