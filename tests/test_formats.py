"""
The labeled formats read as their owners ship them (Aff-Wild2, RAF-DB, FER2013, AffectNet, ImageFolder), format
detection, errors that name the file and line, image modes and the inspect CLI. Each test writes a few files in the
real layout into tmp_path (evaluate.py's tests use these writers too).
"""
import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

import data
from sources import formats
from tools import inspect_data

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
EXPR_HEADER = 'Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other'


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    return path


def image(path, size=(8, 8), colour=(90, 120, 200)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', size, colour).save(path)
    return path


# -----------------------------------------------------------------------------
# Aff-Wild2


def affwild2(root, nested=('Annotations', 'EXPR_Recognition_Challenge')):
    """Two training videos (one split into _left/_right), one validation video, and an AU-track Train_Set/ that
    must not be mistaken for the expression one."""
    sets = os.path.join(root, *nested)
    write(os.path.join(root, 'Annotations', 'AU_Detection_Challenge', 'Train_Set', 'a.txt'), 'AU1,AU2\n0,1\n')
    # video 1: frames 1..6; label -1 at frame 2; frame 5 has no face image
    write(os.path.join(sets, 'Train_Set', '1-30-1280x720.txt'), EXPR_HEADER + '\n0\n-1\n3\n7\n2\n4\n')
    for k in (1, 2, 3, 4, 6):
        image(os.path.join(root, 'cropped_aligned', '1-30-1280x720', f'{k:05d}.jpg'))
    write(os.path.join(sets, 'Train_Set', '10-60-1280x720_left.txt'), EXPR_HEADER + '\n5\n5\n')
    write(os.path.join(sets, 'Train_Set', '10-60-1280x720_right.txt'), EXPR_HEADER + '\n6\n')
    for video, frames in (('10-60-1280x720_left', (1, 2)), ('10-60-1280x720_right', (1,))):
        for k in frames:
            image(os.path.join(root, 'cropped_aligned', video, f'{k:05d}.jpg'))
    write(os.path.join(sets, 'Validation_Set', 'v2.txt'), EXPR_HEADER + '\n1\n1\n')
    image(os.path.join(root, 'cropped_aligned', 'v2', '00002.jpg'))
    return sets


def test_affwild2(tmp_path):
    root = str(tmp_path)
    affwild2(root)
    assert formats.detect_format(root) == 'affwild2'
    train = data.load_labeled(root, 'train')
    frames = os.path.join(root, 'cropped_aligned')
    assert train.items == [os.path.join(frames, '1-30-1280x720', f) for f in ('00001.jpg', '00003.jpg', '00004.jpg',
                                                                               '00006.jpg')] + \
        [os.path.join(frames, '10-60-1280x720_left', f) for f in ('00001.jpg', '00002.jpg')] + \
        [os.path.join(frames, '10-60-1280x720_right', '00001.jpg')]
    assert train.labels == [0, 3, 7, 4, 5, 5, 6]
    assert train.classes == EXPR_HEADER.split(',')
    assert train.skipped == {'label -1 (ignore)': 1, 'annotated frame without a face image': 1}
    val = data.load_labeled(root, 'val')
    assert (len(val), val.labels, val.skipped) == (1, [1], {'annotated frame without a face image': 1})
    assert train.read(0).mode == 'RGB'


def test_affwild2_nested_expr_set_and_errors(tmp_path):
    root = str(tmp_path)
    sets = affwild2(root, nested=('annotations', 'EXPR_Set'))
    assert data.load_labeled(root, 'train', 'affwild2').labels == [0, 3, 7, 4, 5, 5, 6]
    with pytest.raises(ValueError, match="splits train, val, not 'test'"):
        data.load_labeled(root, 'test')
    bad = write(os.path.join(sets, 'Train_Set', '1-30-1280x720.txt'), EXPR_HEADER + '\n0\n1\nx\n')
    with pytest.raises(ValueError, match=f"{bad}, line 4: malformed label 'x'"):
        data.load_labeled(root, 'train')
    write(bad, EXPR_HEADER + '\n0\n8\n')
    with pytest.raises(ValueError, match=f'{bad}, line 3: label 8 out of range -1..7'):
        data.load_labeled(root, 'train')
    write(bad, 'Neutral,Anger\n0\n')
    with pytest.raises(ValueError, match=f"{bad}, line 1: header 'Neutral,Anger'"):
        data.load_labeled(root, 'train')
    # a split whose frames are all ignored or faceless is empty: an error that says which split and where
    write(os.path.join(sets, 'Validation_Set', 'v2.txt'), EXPR_HEADER + '\n-1\n-1\n3\n')
    with pytest.raises(ValueError, match=r"empty 'val' split: no labeled images in .*Validation_Set"):
        data.load_labeled(root, 'val')


# -----------------------------------------------------------------------------
# RAF-DB


def rafdb(root):
    write(os.path.join(root, 'EmoLabel', 'list_patition_label.txt'),
          'train_00001.jpg 5\ntrain_00002.jpg 1\ntest_0001.jpg 7\ntest_0002.jpg 4\n')
    for name in ('train_00001', 'test_0001', 'test_0002'):
        image(os.path.join(root, 'Image', 'aligned', name + '_aligned.jpg'))
    image(os.path.join(root, 'Image', 'original', 'train_00002.jpg'), size=(20, 10))  # no aligned copy
    return os.path.join(root, 'EmoLabel', 'list_patition_label.txt')


def test_rafdb(tmp_path):
    root = str(tmp_path / 'RAF-DB' / 'basic')
    labels_file = rafdb(root)
    for path in (root, str(tmp_path / 'RAF-DB')):  # the basic/ folder or the folder above it
        assert formats.detect_format(path) == 'rafdb'
        train = data.load_labeled(path, 'train')
        assert train.classes == ['Surprise', 'Fear', 'Disgust', 'Happiness', 'Sadness', 'Anger', 'Neutral']
        assert train.labels == [4, 0]
        assert train.items == [os.path.join(root, 'Image', 'aligned', 'train_00001_aligned.jpg'),
                               os.path.join(root, 'Image', 'original', 'train_00002.jpg')]
    val, test = data.load_labeled(root, 'val'), data.load_labeled(root, 'test')
    assert val.items == test.items and val.labels == test.labels == [6, 3]  # RAF-DB has no separate val
    os.remove(os.path.join(root, 'Image', 'aligned', 'test_0002_aligned.jpg'))
    with pytest.raises(ValueError, match=f'{labels_file}, line 4: image not found: .*test_0002_aligned.jpg or '
                                         f'.*original/test_0002.jpg'):
        data.load_labeled(root, 'test')
    write(labels_file, 'train_00001.jpg 5\ntrain_00002.jpg 8\n')
    with pytest.raises(ValueError, match=f'{labels_file}, line 2: label 8 out of range 1..7'):
        data.load_labeled(root, 'train')
    write(labels_file, 'train_00001.jpg 5\ntrain_00002.jpg\n')
    with pytest.raises(ValueError, match=f"{labels_file}, line 2: malformed line 'train_00002.jpg'"):
        data.load_labeled(root, 'train')
    write(labels_file, 'train_00001.jpg 5\n')
    with pytest.raises(ValueError, match="empty 'test' split"):
        data.load_labeled(root, 'test')


# -----------------------------------------------------------------------------
# FER2013


def fer_row(label, usage, value=7):
    return {'emotion': str(label), 'Usage': usage, 'pixels': ' '.join([str(value)] * 2303 + ['255'])}


def fer2013(path, rows, columns=('emotion', 'pixels', 'Usage'), sep=','):
    with open(path, 'w', newline='') as f:
        f.write(sep.join(columns) + '\n')
        writer = csv.writer(f)
        for row in rows:
            writer.writerow([row[c.strip()] for c in columns])
    return path


def test_fer2013(tmp_path):
    rows = [fer_row(3, 'Training', 1), fer_row(0, 'PublicTest'), fer_row(6, 'PrivateTest'), fer_row(6, 'Training')]
    path = fer2013(str(tmp_path / 'fer2013.csv'), rows)
    os.makedirs(tmp_path / 'icml')
    icml = fer2013(str(tmp_path / 'icml' / 'icml_face_data.csv'), rows, columns=('emotion', ' Usage', ' pixels'),
                   sep=', ')
    for source in (path, str(tmp_path), icml, str(tmp_path / 'icml')):
        assert formats.detect_format(source) == 'fer2013'
        train = data.load_labeled(source, 'train')
        assert train.classes == ['Angry', 'Disgust', 'Fear', 'Happy', 'Sad', 'Surprise', 'Neutral']
        assert train.labels == [3, 6]
        assert [len(data.load_labeled(source, s)) for s in ('val', 'test')] == [1, 1]
        assert isinstance(train.items[0], bytes) and len(train.items[0]) == 2304  # compact: one byte a pixel
        face = train.read(0)
        assert face.mode == 'RGB' and face.size == (48, 48)
        assert face.getpixel((0, 0)) == (1, 1, 1) and face.getpixel((47, 47)) == (255, 255, 255)


def test_fer2013_errors(tmp_path):
    path = str(tmp_path / 'fer2013.csv')
    write(path, 'emotion,pixels,Use\n3,1 2 3,Training\n')
    with pytest.raises(ValueError, match=f"{path}, line 1: header 'emotion,pixels,Use'"):
        data.load_labeled(path, 'train')
    short = dict(fer_row(3, 'Training'), pixels='1 2 3')
    fer2013(path, [fer_row(3, 'Training'), short])
    with pytest.raises(ValueError, match=f'{path}, line 3: pixels: expected 2304'):
        data.load_labeled(path, 'train')
    fer2013(path, [fer_row(3, 'Training'), fer_row(7, 'Training')])
    with pytest.raises(ValueError, match=f'{path}, line 3: label 7 out of range 0..6'):
        data.load_labeled(path, 'train')
    fer2013(path, [fer_row(3, 'Training', 256)])
    with pytest.raises(ValueError, match=f'{path}, line 2: pixels'):
        data.load_labeled(path, 'train')
    fer2013(path, [fer_row(3, 'Train')])
    with pytest.raises(ValueError, match=f"{path}, line 2: Usage 'Train'"):
        data.load_labeled(path, 'train')
    fer2013(path, [fer_row(3, 'Training')])
    with pytest.raises(ValueError, match=f"empty 'test' split: no labeled images in {path} \\(Usage PrivateTest\\)"):
        data.load_labeled(path, 'test')


# -----------------------------------------------------------------------------
# AffectNet


def affectnet(root, rows, header=True, name='training.csv'):
    """rows: (relative image path, expression); every image is 40x30 with a face box (2, 3, 10, 12)."""
    lines = ['subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,'
             'arousal'] if header else []
    for file, expression in rows:
        lines.append(f'{file},2,3,10,12,1.5;2.5;3.5,{expression},0.1,-0.2')
        image(os.path.join(root, 'Manually_Annotated_Images', file), size=(40, 30))
    return write(os.path.join(root, 'Manually_Annotated_file_lists', name), '\n'.join(lines) + '\n')


def test_affectnet(tmp_path):
    root = str(tmp_path)
    affectnet(root, [(f'{k}/img{k}.jpg', k) for k in range(11)])
    affectnet(root, [('20/a.png', 1), ('21/b.jpg', 7)], header=False, name='validation.csv')  # no header row
    assert formats.detect_format(root) == 'affectnet'
    train = data.load_labeled(root, 'train')
    assert train.classes == ['Neutral', 'Happy', 'Sad', 'Surprise', 'Fear', 'Disgust', 'Anger', 'Contempt']
    assert train.labels == list(range(8))
    assert train.items[1] == (os.path.join(root, 'Manually_Annotated_Images', '1', 'img1.jpg'), (2, 3, 10, 12))
    assert train.skipped == {'expression 8 (None)': 1, 'expression 9 (Uncertain)': 1, 'expression 10 (Non-Face)': 1}
    assert train.read(0).size == (10, 12)  # cropped to the face box
    seven = data.load_labeled(root, 'train', 'affectnet7')
    assert len(seven.classes) == 7 and seven.labels == list(range(7))
    assert seven.skipped['expression 7 (Contempt, 7-class protocol)'] == 1
    assert data.load_labeled(root, 'val').labels == [1, 7]


def test_affectnet_errors(tmp_path):
    root = str(tmp_path)
    path = affectnet(root, [('1/a.jpg', 0), ('1/b.jpg', 12)])
    with pytest.raises(ValueError, match=f'{path}, line 3: expression 12 out of range 0..10'):
        data.load_labeled(root, 'train')
    path = affectnet(root, [('1/a.jpg', 0), ('1/b.jpg', 3)])
    os.remove(os.path.join(root, 'Manually_Annotated_Images', '1', 'b.jpg'))
    with pytest.raises(ValueError, match=f'{path}, line 3: image not found: .*1/b.jpg'):
        data.load_labeled(root, 'train')
    write(path, 'file,x,y,w,h,expression\n1/a.jpg,1,2,3,4,0\n')
    with pytest.raises(ValueError, match=f"{path}, line 1: header 'file,x,y"):
        data.load_labeled(root, 'train')
    path = affectnet(root, [('1/a.jpg', 8), ('1/c.jpg', 9)])
    with pytest.raises(ValueError, match=r"empty 'train' split: .*training.csv \(skipped: \{'expression 8 "):
        data.load_labeled(root, 'train')


# -----------------------------------------------------------------------------
# ImageFolder, detection, unreadable images, image modes


def test_imagefolder_and_detection(tmp_path):
    for split, name, count in (('train', 'happy', 2), ('train', 'angry', 1), ('val', 'happy', 1)):
        for i in range(count):
            image(str(tmp_path / 'set' / split / name / f'{i}.png'))
    assert formats.detect_format(str(tmp_path / 'set')) == 'imagefolder'
    train = data.load_labeled(str(tmp_path / 'set'), 'train')
    assert (train.classes, train.labels) == (['angry', 'happy'], [0, 1, 1])
    os.makedirs(tmp_path / 'set' / 'test' / 'happy')
    with pytest.raises(ValueError, match="empty 'test' split"):
        data.load_labeled(str(tmp_path / 'set'), 'test')
    os.makedirs(tmp_path / 'nothing')
    with pytest.raises(ValueError, match='unknown dataset format.*--format'):
        data.load_labeled(str(tmp_path / 'nothing'), 'train')
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        data.load_labeled(str(tmp_path / 'set'), 'train', 'csv')


def test_unreadable_image_names_the_file(tmp_path):
    root = str(tmp_path)
    rafdb(root)
    write(os.path.join(root, 'Image', 'aligned', 'train_00001_aligned.jpg'), 'not a jpeg')
    train = data.load_labeled(root, 'train')
    with pytest.raises(RuntimeError, match='cannot read image .*train_00001_aligned.jpg'):
        train.read(0)


def test_to_rgb_modes(tmp_path):
    """Every mode a face file comes in loads as 8-bit RGB with the right colour."""
    cases = {'grey.png': (Image.new('L', (4, 4), 128), (128, 128, 128)),
             'palette.png': (Image.new('L', (4, 4), 60).convert('P'), (60, 60, 60)),
             'cmyk.jpg': (Image.new('CMYK', (4, 4), (0, 255, 0, 0)), (255, 0, 255)),
             'rgba.png': (Image.new('RGBA', (4, 4), (200, 100, 50, 128)), (100, 50, 25)),  # composited on black
             'grey_alpha.png': (Image.new('LA', (4, 4), (200, 255)), (200, 200, 200))}
    sixteen = Image.new('I;16', (4, 4))
    sixteen.putdata([40000] * 16)  # 40000 / 256 = 156
    cases['grey16.png'] = sixteen, (156, 156, 156)
    for name, (im, expected) in cases.items():
        im.save(tmp_path / name)
        with Image.open(tmp_path / name) as opened:
            assert opened.mode == im.mode, name  # the file really is in that mode
        rgb = formats.open_image(str(tmp_path / name))
        assert rgb.mode == 'RGB' and rgb.getpixel((0, 0)) == pytest.approx(expected, abs=2), name


# -----------------------------------------------------------------------------
# python tools/inspect_data.py PATH ... --json


def test_inspect_cli(tmp_path):
    affwild2(str(tmp_path / 'aff'))
    rafdb(str(tmp_path / 'raf'))
    image(str(tmp_path / 'pool' / 'a' / '1.jpg'))
    image(str(tmp_path / 'pool' / '2.jpg'))
    paths = [str(tmp_path / p) for p in ('aff', 'raf', 'pool', 'missing')]
    result = subprocess.run([sys.executable, os.path.join(HERE, 'tools', 'inspect_data.py'), *paths, '--json'], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    aff, raf, pool, missing = json.loads(result.stdout)
    assert aff['format'] == 'affwild2' and aff['splits']['train']['images'] == 7
    assert aff['splits']['train']['classes'] == dict(zip(EXPR_HEADER.split(','), [1, 0, 0, 1, 1, 2, 1, 1]))
    assert aff['splits']['train']['skipped'] == {'label -1 (ignore)': 1, 'annotated frame without a face image': 1}
    assert aff['splits']['val']['images'] == 1
    assert raf['format'] == 'rafdb' and raf['splits']['test']['classes']['Neutral'] == 1
    assert pool == dict(path=paths[2], format='unlabeled', images=2, checked=True, readable=2, unreadable={}, examples={})
    assert missing == dict(path=paths[3], error=f'{paths[3]}: no such file or folder')
    assert result.returncode == 1  # a path that could not be read
    text = inspect_data.describe_text(aff)
    assert text.startswith(f'{paths[0]}: affwild2\n  train: 7 images from ') and 'skipped 1: label -1 (ignore)' in text
