"""
evaluate.py from the command line: every mistake ends in one line naming what is wrong; --predict labels every
readable image with the model's own probabilities and reports the unreadable ones; evaluation on a set with other
classes (a subset, synonyms, another order) against scikit-learn; the metrics file's name; the ABAW submission in the
ABAW label order whatever the checkpoint's. The model's outputs are recomputed here from the image files with PIL and
a hand-written normalisation.
"""
import csv
import json
import os
import subprocess
import sys

import pytest
import sklearn.metrics as skm
import torch
from PIL import Image

import evaluate
from model import build_model
from sources import formats
from test_formats import EXPR_HEADER, affwild2, image, rafdb, write

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SIZE = 16  # the checkpoints' img_size


def noise_image(path, seed, size=(SIZE, SIZE)):
    """A tinted noise image, saved losslessly."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand(size[1], size[0], 3, generator=generator) * torch.rand(3, generator=generator) * 255
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.frombytes('RGB', size, bytes(pixels.to(torch.uint8).flatten().tolist())).save(path)
    return path


def reference_inputs(paths):
    """The model's input for image files, built here: PIL decodes and resizes, then (x / 255 - 0.5) / 0.5."""
    batch = []
    for path in paths:
        with Image.open(path) as im:
            im = im.convert('RGB')
        if im.size != (SIZE, SIZE):
            im = im.resize((SIZE, SIZE), Image.BILINEAR)  # antialiased when it shrinks, as torchvision's Resize
        x = torch.tensor(list(im.tobytes()), dtype=torch.float32).view(SIZE, SIZE, 3).permute(2, 0, 1)
        batch.append((x / 255 - 0.5) / 0.5)
    return torch.stack(batch)


@torch.no_grad()
def tiny_checkpoint(path, classes, spread_over=None):
    """A checkpoint with the layout train.py's save() writes, and its model. With spread_over (a batch of inputs),
    each logit is standardised over that batch, so the model predicts every class on some of those images."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.manual_seed(0)
    model = build_model('resnet18', len(classes)).eval()
    if spread_over is not None:
        fc, model.fc = model.fc, torch.nn.Identity()
        features = model(spread_over)
        model.fc = fc
        fc.weight.div_(fc(features).std(0, keepdim=True).T)
        fc.bias.copy_(-(features @ fc.weight.T).mean(0))
    torch.save(dict(model=model.state_dict(), ema_model=model.state_dict(), step=7, classes=list(classes),
                    config=dict(arch='resnet18', img_size=SIZE, grey=False)), path)
    return path, model


def one_line_error(argv):
    """evaluate.main(argv) stops with one line (SystemExit's message, which Python prints on stderr, exit status 1)."""
    with pytest.raises(SystemExit) as stop:
        evaluate.main(argv)
    message = stop.value.code
    assert isinstance(message, str) and message and '\n' not in message, repr(message)
    return message


# -----------------------------------------------------------------------------
# mistakes: one line each, naming the flag, file or line


def test_mistakes_end_in_one_line_naming_what_is_wrong(tmp_path):
    ckpt, _ = tiny_checkpoint(str(tmp_path / 'best.pt'), ['smirk', 'yawn'])  # classes of no known set
    raf = str(tmp_path / 'raf')
    labels_file = rafdb(raf)
    garbage = write(str(tmp_path / 'notes.pt'), 'not a checkpoint')
    torch.save(dict(model={}), str(tmp_path / 'other.pt'))
    abaw = str(tmp_path / 'abaw')
    affwild2(abaw)
    os.makedirs(tmp_path / 'empty')
    cases = [
        ([ckpt, '--data', raf, '--bogus'], 'unrecognized arguments: --bogus'),
        ([ckpt, '--data', raf, '--batch-size', 'x'], '--batch-size'),
        ([ckpt, '--data', raf, '--batch-size', '0'], '--batch-size 0: must be at least 1'),
        ([ckpt, '--data', raf, '--workers', '-1'], '--workers -1: must be at least 0'),
        ([ckpt, '--data', raf, '--split', 'dev'], '--split'),
        ([ckpt, '--data', raf, '--format', 'csv'], '--format'),
        ([ckpt], '--data'),
        ([ckpt, '--data', str(tmp_path / 'nowhere')], 'nowhere'),
        ([str(tmp_path / 'none.pt'), '--data', raf], 'none.pt'),
        ([garbage, '--data', raf], f'checkpoint {garbage}: not a file written by torch.save'),
        ([str(tmp_path / 'other.pt'), '--data', raf], 'other.pt: not a checkpoint of this project (no ema_model'),
        ([ckpt, '--predict', str(tmp_path / 'absent.jpg')], '--predict ' + str(tmp_path / 'absent.jpg')),
        ([ckpt, '--predict', str(tmp_path / 'empty')], 'empty: no image files found'),
        ([ckpt, '--data', raf, '--out', str(tmp_path / 'no' / 'm.json')], '--out'),
        ([ckpt, '--data', abaw, '--submission', str(tmp_path / 's.txt')], '--videos'),
        ([ckpt, '--data', raf, '--videos', 'v1'], '--submission'),
        ([ckpt, '--data', abaw, '--submission', str(tmp_path / 's.txt'), '--videos', 'v2'], 'not Aff-Wild2 classes'),
        ([ckpt, '--data', str(tmp_path / 'empty')], 'unknown dataset format'),
        ([ckpt, '--data', raf, '--split', 'test'], 'none of its classes'),
    ]
    for argv, expected in cases:
        assert expected in one_line_error(argv + ['--workers', '0'] * ('--workers' not in argv)), argv
    wrong_size, _ = tiny_checkpoint(str(tmp_path / 'wrong.pt'), ['happy', 'sad'])
    checkpoint = torch.load(wrong_size, weights_only=True)
    checkpoint['classes'] = ['happy', 'sad', 'angry']  # 3 names, 2 outputs
    torch.save(checkpoint, wrong_size)
    assert 'wrong.pt: its weights do not fit' in one_line_error([wrong_size, '--data', raf])
    write(labels_file, 'train_00001.jpg 5\ntest_0001.jpg 9\n')  # a bad label in the annotation file
    ckpt, _ = tiny_checkpoint(str(tmp_path / 'raf.pt'), formats.RAFDB_CLASSES)
    assert f'{labels_file}, line 2: label 9 out of range' in one_line_error([ckpt, '--data', raf, '--split', 'test'])
    two = str(tmp_path / 'two')
    for name in ('happy', 'Happiness'):
        noise_image(os.path.join(two, 'val', name, '0.png'), 0)
    assert 'Happiness and happy are one expression' in one_line_error([ckpt, '--data', two, '--workers', '0'])


def test_a_mistake_from_the_shell_prints_one_line_without_traceback(tmp_path):
    """As Python prints SystemExit's message; here for an error formats.py raises while reading the data."""
    raf = str(tmp_path / 'raf')
    labels_file = rafdb(raf)
    write(labels_file, 'train_00001.jpg 5\ntrain_00002.jpg 1\ntest_0001.jpg seven\n')
    ckpt, _ = tiny_checkpoint(str(tmp_path / 'best.pt'), formats.RAFDB_CLASSES)
    result = subprocess.run([sys.executable, os.path.join(HERE, 'evaluate.py'), ckpt, '--data', raf, '--split', 'test',
                             '--workers', '0'], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert result.stderr.splitlines() == [f"error: {labels_file}, line 3: malformed label 'seven', expected an "
                                          f"integer 1..7"], result.stderr


# -----------------------------------------------------------------------------
# --predict


def test_predict_labels_every_readable_image_with_the_models_probabilities(tmp_path, capsys):
    good = [noise_image(str(tmp_path / 'faces' / 'x' / 'a.png'), 1), noise_image(str(tmp_path / 'faces' / 'b.png'), 2),
            noise_image(str(tmp_path / 'c.png'), 3)]
    bad = write(str(tmp_path / 'faces' / 'broken.jpg'), 'not a jpeg')
    resized = noise_image(str(tmp_path / 'big.png'), 4, size=(40, 28))  # decoded, then resized to 16 x 16
    classes = ['happy', 'sad', 'other']
    ckpt, model = tiny_checkpoint(str(tmp_path / 'best.pt'), classes, spread_over=reference_inputs(good + [resized]))
    out = str(tmp_path / 'labels.csv')
    evaluate.main([ckpt, '--predict', str(tmp_path / 'faces'), good[2], resized, '--out', out, '--workers', '0',
                   '--batch-size', '2'])
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['file', 'prediction', *classes]
    assert [r[0] for r in rows[1:]] == [good[1], bad, good[0], good[2], resized]  # scan order, then the files
    broken = rows[2]
    assert broken[1].startswith('unreadable: ') and len(broken[1]) > len('unreadable: ') and broken[2:] == [''] * 3
    rows = [rows[1], rows[3], rows[4], rows[5]]
    expected = torch.no_grad()(model.eval())(reference_inputs([good[1], good[0], good[2], resized])).softmax(1)
    for row, probs in zip(rows, expected):
        assert [float(v) for v in row[2:]] == pytest.approx(probs.tolist(), abs=6e-5 if row[0] != resized else 0.02)
        assert row[1] == classes[int(probs.argmax())]
    assert len({row[1] for row in rows}) > 1  # the model is not constant: the comparison means something
    stderr = capsys.readouterr().err
    assert '1 of 5 images could not be read' in stderr and bad in stderr and good[0] not in stderr


# -----------------------------------------------------------------------------
# evaluation on a set with other classes


def image_folder(root, counts, seed=0):
    """root/test/<class>/<i>.png: counts[class] noise images each; returns (paths, labels) in the set's order."""
    paths, labels = [], []
    for label, name in enumerate(sorted(counts)):
        for i in range(counts[name]):
            paths.append(noise_image(os.path.join(root, 'test', name, f'{i}.png'), seed + 100 * label + i))
            labels.append(label)
    return paths, labels


def test_evaluation_matches_classes_by_name_and_synonym(tmp_path, capsys):
    # the set: angry, contempt (the model lacks it), happy, neutral; the model: its own names, another order, and
    # Sadness and Other, which the set lacks
    root = str(tmp_path / 'My Set!')
    paths, labels = image_folder(root, dict(angry=7, contempt=3, happy=8, neutral=6))
    model_classes = ['Neutral', 'Anger', 'Happiness', 'Sadness', 'Other']
    inputs = reference_inputs(paths)
    ckpt, model = tiny_checkpoint(str(tmp_path / 'run' / 'best.pt'), model_classes, spread_over=inputs)
    with torch.no_grad():
        logits = model.eval()(inputs)
    keep = [i for i, label in enumerate(labels) if label != 1]  # contempt's images are left out
    y_true = [{0: 0, 2: 1, 3: 2}[labels[i]] for i in keep]  # evaluated classes: angry, happy, neutral
    outputs = [1, 2, 0]  # Anger, Happiness, Neutral
    for flag, y_pred in (([], logits[keep][:, outputs].argmax(1).tolist()),
                         (['--all-classes'], [outputs.index(c) if c in outputs else -1  # Sadness, Other: wrong
                                              for c in logits[keep].argmax(1).tolist()])):
        evaluate.main([ckpt, '--data', root, '--split', 'test', '--workers', '0', *flag])
        with open(tmp_path / 'run' / 'metrics_My_Set__test.json') as f:
            metrics = json.load(f)
        assert metrics['classes'] == ['angry', 'happy', 'neutral']
        assert metrics['macro_f1'] == pytest.approx(skm.f1_score(y_true, y_pred, labels=[0, 1, 2], average='macro',
                                                                 zero_division=0), abs=1e-12)
        assert metrics['accuracy'] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
        recall = skm.recall_score(y_true, y_pred, labels=[0, 1, 2], average=None, zero_division=0)
        assert [m['recall'] for m in metrics['per_class'].values()] == pytest.approx(recall.tolist(), abs=1e-12)
        assert metrics['skipped'] == {'class contempt, unknown to the model': 3}
        assert metrics['class_match'] == dict(angry='Anger', happy='Happiness', neutral='Neutral')
        assert metrics['model_classes_absent'] == ['Sadness', 'Other']
        printed = capsys.readouterr().out
        assert 'angry -> Anger, happy -> Happiness, neutral -> Neutral' in printed
        assert 'left out 3 images of classes the model does not know: contempt 3' in printed
        assert 'model classes the set lacks: Sadness, Other' in printed
    assert -1 in y_pred and len(set(y_pred)) > 2  # both protocols were really exercised


def test_same_classes_keep_their_metrics_and_files_do_not_collide(tmp_path, capsys):
    root = str(tmp_path / 'tints')
    paths, labels = image_folder(root, dict(a=5, b=6, c=4))
    for split in ('train', 'val'):
        os.symlink(os.path.join(root, 'test'), os.path.join(root, split))
    ckpt, model = tiny_checkpoint(str(tmp_path / 'best.pt'), ['a', 'b', 'c'], spread_over=reference_inputs(paths))
    with torch.no_grad():
        y_pred = model.eval()(reference_inputs(paths)).argmax(1).tolist()
    for split in ('val', 'test'):
        evaluate.main([ckpt, '--data', root + '/', '--split', split, '--workers', '0'])
    assert 'classes of the set' not in capsys.readouterr().out  # nothing to match: the same names, in order
    for split in ('val', 'test'):
        with open(tmp_path / f'metrics_tints_{split}.json') as f:
            metrics = json.load(f)
        assert metrics['split'] == split and metrics['step'] == 7
        assert metrics['confusion'] == skm.confusion_matrix(labels, y_pred, labels=[0, 1, 2]).tolist()
    evaluate.main([ckpt, '--data', root, '--out', str(tmp_path / 'chosen.json'), '--workers', '0'])
    assert json.load(open(tmp_path / 'chosen.json'))['split'] == 'val'


def test_evaluate_with_format(tmp_path):
    root = str(tmp_path / 'raf')
    rafdb(root)
    ckpt, _ = tiny_checkpoint(str(tmp_path / 'best.pt'), formats.RAFDB_CLASSES)
    out = str(tmp_path / 'metrics.json')
    evaluate.main([ckpt, '--data', root, '--format', 'rafdb', '--split', 'test', '--out', out, '--workers', '0'])
    with open(out) as f:
        metrics = json.load(f)
    assert metrics['classes'] == list(formats.RAFDB_CLASSES) and metrics['split'] == 'test'
    assert sum(m['support'] for m in metrics['per_class'].values()) == 2


# -----------------------------------------------------------------------------
# the ABAW submission


def test_nearest_fill():
    assert evaluate.nearest_fill({2: 'a', 5: 'b'}, 7) == ['a', 'a', 'a', 'b', 'b', 'b', 'b']
    assert evaluate.nearest_fill({2: 'a', 4: 'b'}, 4) == ['a', 'a', 'a', 'b']  # frame 3: a tie, the earlier wins


FER_TO_ABAW = {'Angry': 'Anger', 'Happy': 'Happiness', 'Sad': 'Sadness'}


def read_submission(path):
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0] == 'image_location,' + EXPR_HEADER
    return [line.split(',')[0] for line in lines[1:]], [int(line.split(',')[1]) for line in lines[1:]]


def test_submission_in_abaw_order_for_any_class_order(tmp_path, capsys):
    root = str(tmp_path)
    affwild2(root)
    # a test video without annotations: 8 frames, faces in 1, 2, 5, 6 and 8
    folder = os.path.join(root, 'cropped_aligned', 'test_video')
    faces = [noise_image(os.path.join(folder, f'{k:05d}.jpg'), k) for k in (1, 2, 5, 6, 8)]
    write(faces[3], 'not a jpeg')  # frame 6 is unreadable: it counts as a frame without a face
    readable = [faces[i] for i in (0, 1, 2, 4)]
    permuted = ['Happiness', 'Other', 'Neutral', 'Surprise', 'Anger', 'Fear', 'Sadness', 'Disgust']
    fer_names = list(formats.FER2013_CLASSES) + ['Other']  # synonyms: Angry, Happy, Sad
    videos = write(str(tmp_path / 'videos.txt'), 'test_video\n')
    for classes in (permuted, fer_names):
        inputs = reference_inputs(readable)
        ckpt, model = tiny_checkpoint(str(tmp_path / 'best.pt'), classes, spread_over=inputs)
        with torch.no_grad():
            predicted = model.eval()(inputs).argmax(1).tolist()
        abaw = [EXPR_HEADER.split(',').index(FER_TO_ABAW.get(classes[c], classes[c])) for c in predicted]
        out = str(tmp_path / 'submission.txt')
        evaluate.main([ckpt, '--data', root, '--submission', out, '--videos', videos, '--workers', '0'])
        names, labels = read_submission(out)
        assert names == [f'test_video/{k:05d}.jpg' for k in range(1, 9)]
        a, b, c, d = abaw  # frames 1, 2, 5, 8; 3 ties between 2 and 5 (the earlier wins), 6 and 7 are nearest 5 / 8
        assert labels == [a, b, b, c, c, c, d, d]
        assert len(set(abaw)) > 1
        assert 'warning: 1 of 5 images could not be read' in capsys.readouterr().err


def test_submission_frame_counts_and_videos(tmp_path):
    root = str(tmp_path)
    affwild2(root)
    for k in (1, 2, 5):  # a test video without annotations: 5 frames, faces found in 1, 2 and 5
        image(os.path.join(root, 'cropped_aligned', 'test_video', f'{k:05d}.jpg'), colour=(10 * k, 0, 0))
    ckpt, _ = tiny_checkpoint(str(tmp_path / 'best.pt'), EXPR_HEADER.split(','))
    out = str(tmp_path / 'submission.txt')
    evaluate.main([ckpt, '--data', root, '--submission', out, '--videos', 'test_video', '1-30-1280x720',
                   '--workers', '0'])
    names, labels = read_submission(out)
    # test_video: 5 frames (its highest frame number); 1-30-1280x720: 6 frames (its annotation's length)
    assert names == [f'test_video/{k:05d}.jpg' for k in range(1, 6)] + \
        [f'1-30-1280x720/{k:05d}.jpg' for k in range(1, 7)]
    assert labels[5 + 4] in (labels[5 + 3], labels[5 + 5])  # 1-30-1280x720's frame 5 has no face
    assert 'video nope has no face images' in one_line_error(
        [ckpt, '--data', root, '--submission', out, '--videos', 'nope', '--workers', '0'])
