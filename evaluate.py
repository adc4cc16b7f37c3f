"""
Evaluation and prediction with a saved checkpoint, which carries the class names, architecture and input size.

    python evaluate.py runs/x/best.pt --data data/faces --split val    # table; runs/x/metrics_faces_val.json
    python evaluate.py best.pt --data RAF-DB/ --split test              # another set: classes matched by name
    python evaluate.py best.pt --data Aff-Wild2/ --submission sub.csv --videos test_videos.txt
    python evaluate.py best.pt --predict photos/ face.jpg --out predictions.csv

Metrics: confusion matrix, per-class precision / recall / F1, macro F1 and accuracy, in torch; on Aff-Wild2 the macro
F1 over its 8 classes is the ABAW expression-track metric. The classes of --data are matched to the model's by name,
case-insensitively and with the usual synonyms (angry = anger, happy = happiness, ...): images of classes the model
does not know are left out, macro F1 is over the shared classes, and the prediction is the argmax over the shared
classes (the usual cross-dataset protocol), or with --all-classes over all the model's, a class the set lacks then
counting as wrong. --submission writes the ABAW file, labels in the ABAW order: one for every frame of each video,
frames without a readable face image taking the nearest face frame's label. --predict labels face images (files, or
folders of them): a CSV of file, predicted class and class probabilities; a file that cannot be read gets the row
`unreadable: <reason>` and is listed on stderr. Any mistake in the command line, checkpoint or data ends with one line
on stderr saying what to fix.
"""
import argparse
import csv
import json
import os
import re
import sys

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import data
from sources import formats, pools
from sources.formats import canonical_class
from model import ARCHS, build_model, load_file

def confusion_matrix(predictions, targets, num_classes, num_predicted=None):
    """cm[i, j] = number of samples of true class i predicted as class j; num_predicted (default num_classes)
    columns, those past num_classes being predictions of classes outside the evaluated ones."""
    num_predicted = num_predicted or num_classes
    index = targets.long() * num_predicted + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_predicted).reshape(num_classes, num_predicted)


def metrics_from_confusion(cm, class_names, other_names=()):
    """Precision_c = TP/(TP+FP), recall_c = TP/(TP+FN), F1_c = 2PR/(P+R) (0 where undefined, as scikit-learn's
    zero_division=0); macro F1 = mean_c F1_c over class_names; accuracy = trace/total. Columns of cm past
    class_names are predictions of other_names, classes the set lacks: wrong, so they lower recall only."""
    cm, C = cm.double(), len(class_names)
    tp, predicted, support = cm.diag(), cm[:, :C].sum(0), cm.sum(1)
    precision, recall = tp / predicted.clamp(min=1), tp / support.clamp(min=1)
    f1 = 2 * tp / (predicted + support).clamp(min=1)  # = 2PR/(P+R), and 0 when TP = 0
    metrics = dict(macro_f1=f1.mean().item(), accuracy=(tp.sum() / cm.sum().clamp(min=1)).item(),
                   per_class={name: dict(precision=p, recall=r, f1=f, support=int(s)) for name, p, r, f, s in
                              zip(class_names, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist())},
                   confusion=cm.long().tolist(), classes=list(class_names))
    if other_names:
        metrics['other_predictions'] = dict(zip(other_names, cm[:, C:].sum(0).long().tolist()))
    return metrics


class Images(Dataset):
    """(uint8 image, label, '') for each image source, or (blank image, label, why) for one that cannot be read:
    one bad file among thousands is reported, and never stops the run."""

    def __init__(self, items, labels, img_size, grey=False):
        self.items, self.labels, self.decode = items, labels, data.Decode(img_size, grey)
        self.blank = torch.zeros(3, img_size, img_size, dtype=torch.uint8)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        try:
            image = formats.open_image(self.items[index])
        except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, EOFError... on bad files
            return self.blank, self.labels[index], str(error) or type(error).__name__
        return self.decode(image), self.labels[index], ''


@torch.no_grad()
def predict(model, loader, device, autocast):
    """Class probabilities [N, C], labels [N] and why each image could not be read ('' where it was), for the
    batches of (uint8 images, labels) or (images, labels, reasons) in loader."""
    model.eval()
    probs, labels, unreadable = [], [], []
    for images, targets, *why in loader:
        with autocast:
            logits = model(data.normalize(images.to(device, non_blocking=True)))
        probs.append(logits.float().softmax(dim=1))
        labels.append(torch.as_tensor(targets).to(device))
        unreadable.extend(why[0] if why else [''] * len(images))
    return torch.cat(probs), torch.cat(labels), unreadable


def evaluate(model, loader, device, class_names, autocast, outputs=None, other_names=()):
    """Metrics over the loader's readable samples. outputs: the model output of each of class_names, then of each of
    other_names (those predictions count as wrong); the argmax is over these only. None: the model's own classes.
    Under torch.distributed each rank holds a disjoint shard and the confusion matrices are summed, so the metrics
    cover the whole set exactly once. metrics['unreadable'] = {position in the loader: why}, where any."""
    probs, labels, unreadable = predict(model, loader, device, autocast)
    probs = probs if outputs is None else probs[:, outputs]
    read = torch.tensor([not why for why in unreadable], dtype=torch.bool, device=device)
    cm = confusion_matrix(probs.argmax(dim=1)[read], labels[read], len(class_names), probs.shape[1])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm)
    metrics = metrics_from_confusion(cm.cpu(), class_names, other_names)
    if not read.all():
        metrics['unreadable'] = {i: why for i, why in enumerate(unreadable) if why}
    return metrics


def format_table(metrics):
    lines = [f'{"class":<12} {"precision":>9} {"recall":>7} {"f1":>7} {"support":>8}']
    for name, m in metrics['per_class'].items():
        lines.append(f'{name:<12} {m["precision"]:9.4f} {m["recall"]:7.4f} {m["f1"]:7.4f} {m["support"]:8d}')
    if 'other_predictions' in metrics:
        lines.append('predicted as classes the set lacks (wrong): ' +
                     ', '.join(f'{name} {n}' for name, n in metrics['other_predictions'].items()))
    lines.append(f'macro F1 {metrics["macro_f1"]:.4f}   accuracy {metrics["accuracy"]:.4f}')
    return '\n'.join(lines)


def report_unreadable(total, names, what_happened):
    if names:
        print(f'warning: {len(names)} of {total} images could not be read, {what_happened}: {", ".join(names)}',
              file=sys.stderr)


def match_classes(set_classes, model_classes, where):
    """(shared, outputs, absent): the indices of the set's classes the model knows, in the set's order; the model's
    class for each; the model's classes the set lacks. Names match case-insensitively, synonyms alike."""
    model_index = {}
    for i, name in enumerate(model_classes):
        model_index.setdefault(canonical_class(name), i)
    same = [(a, b) for a in set_classes for b in set_classes if a < b and canonical_class(a) == canonical_class(b)]
    if same:
        raise SystemExit(f'{where}: its classes {" and ".join(same[0])} are one expression; merge them')
    shared = [k for k, name in enumerate(set_classes) if canonical_class(name) in model_index]
    if not shared:
        raise SystemExit(f'{where}: none of its classes ({", ".join(set_classes)}) is a class of the checkpoint '
                         f'({", ".join(model_classes)}); evaluate on a set of the same expressions')
    outputs = [model_index[canonical_class(set_classes[k])] for k in shared]
    return shared, outputs, [i for i in range(len(model_classes)) if i not in outputs]


# -----------------------------------------------------------------------------
# labeling images that have no labels: --predict, and the ABAW --submission


def write_predictions(path, files, probs, unreadable, classes):
    with open(path, 'w', newline='') as f:
        out = csv.writer(f)
        out.writerow(['file', 'prediction', *classes])
        for file, label, p, why in zip(files, probs.argmax(dim=1).tolist(), probs.tolist(), unreadable):
            if why:
                out.writerow([file, f'unreadable: {why}', *[''] * len(classes)])
            else:
                out.writerow([file, classes[label], *(f'{v:.4f}' for v in p)])


def video_names(videos):
    """--videos: the names themselves, or one file listing them a line each (as ABAW ships the test set)."""
    if len(videos) == 1 and os.path.isfile(videos[0]):
        with open(videos[0]) as f:
            return [line.strip() for line in f if line.strip()]
    return videos


def video_frames(root, videos):
    """{video: (number of frames N, {frame: image path})} for Aff-Wild2 videos. N is the annotation's length where
    the video has one; a test video has none, so N is the highest frame number in its cropped_aligned folder."""
    annotations, frames = formats.find_affwild2(root)
    if frames is None:
        raise SystemExit(f'--data {root}: no Aff-Wild2 cropped_aligned/ folder; pass the Aff-Wild2 root')
    found = {}
    for video in videos:
        folder = os.path.join(frames, video)
        files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        faces = {int(f[:-4]): os.path.join(folder, f) for f in files if f.endswith('.jpg') and f[:-4].isdigit()}
        sets = ('Train_Set', 'Validation_Set') if annotations else ()
        txt = [path for path in (os.path.join(annotations, s, video + '.txt') for s in sets) if os.path.isfile(path)]
        count = len(formats.read_lines(txt[0], ','.join(formats.AFFWILD2_CLASSES))) if txt else max(faces, default=0)
        faces = {k: path for k, path in faces.items() if k <= count}
        if not faces:
            raise SystemExit(f'--videos: video {video} has no face images in {folder}; check the name')
        found[video] = count, faces
    return found


def nearest_fill(labels, count):
    """Labels of frames 1..count from {frame: label} of the frames that have a face image: the others take the
    label of the nearest face frame (the earlier on a tie), since the submission needs a label for every frame."""
    known, j, filled = sorted(labels), 0, []
    for frame in range(1, count + 1):
        while j + 1 < len(known) and abs(known[j + 1] - frame) < abs(known[j] - frame):
            j += 1
        filled.append(labels[known[j]])
    return filled


def write_submission(path, found, predicted, classes):
    """The ABAW expression-track file: its header, then `video/00001.jpg,label` for every frame of every video, the
    label an index into AFFWILD2_CLASSES whatever the checkpoint's order. predicted: a model class per face frame, in
    the order of found, or None for an unreadable image (the frame then counts as one without a face)."""
    abaw = [canonical_class(name) for name in formats.AFFWILD2_CLASSES]
    to_abaw = [abaw.index(canonical_class(name)) for name in classes]
    predicted = iter(predicted)
    with open(path, 'w') as f:
        f.write('image_location,' + ','.join(formats.AFFWILD2_CLASSES) + '\n')
        for video, (count, faces) in found.items():
            labels = {frame: label for frame, label in zip(faces, predicted) if label is not None}
            if not labels:
                raise SystemExit(f'--videos: video {video} has no readable face image')
            labels = nearest_fill({frame: to_abaw[label] for frame, label in labels.items()}, count)
            f.writelines(f'{video}/{frame:05d}.jpg,{label}\n' for frame, label in enumerate(labels, 1))


# -----------------------------------------------------------------------------
# the command line: evaluate (default), --predict, --submission


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise SystemExit(f'evaluate.py: {message} (see --help)')


def load_checkpoint(path):
    """(checkpoint, model with its EMA weights) from a best.pt or last.pt train.py wrote, checked for the keys read."""
    what = 'pass a best.pt or last.pt written by train.py'
    if not os.path.isfile(path):
        raise SystemExit(f'checkpoint {path}: no such file; {what}')
    try:
        checkpoint = load_file(path)
    except ValueError as error:  # not a torch file, damaged, or holding objects that could run code
        raise SystemExit(f'checkpoint {error}; {what}')
    missing = [k for k in ('ema_model', 'config', 'classes', 'step') if not isinstance(checkpoint, dict) or
               k not in checkpoint] or [k for k in ('arch', 'img_size') if k not in checkpoint['config']]
    if missing or checkpoint['config']['arch'] not in ARCHS:
        raise SystemExit(f'checkpoint {path}: not a checkpoint of this project (no {", ".join(missing) or "arch"}); '
                         f'{what}')
    model = build_model(checkpoint['config']['arch'], len(checkpoint['classes']))
    try:
        model.load_state_dict(checkpoint['ema_model'])
    except RuntimeError:
        raise SystemExit(f'checkpoint {path}: its weights do not fit a {checkpoint["config"]["arch"]} of '
                         f'{len(checkpoint["classes"])} classes; {what}') from None
    return checkpoint, model


def check_args(args):
    """Every value of the command line, before any work: one line saying what to fix."""
    if args.batch_size < 1:
        raise SystemExit(f'--batch-size {args.batch_size}: must be at least 1')
    if args.workers < 0:
        raise SystemExit(f'--workers {args.workers}: must be at least 0 (0 reads the images in this process)')
    if not args.data and (args.submission or not args.predict):
        raise SystemExit('--data is required: the labeled set to evaluate on, or the Aff-Wild2 root with --submission')
    if args.submission and not args.videos or args.videos and not args.submission:
        raise SystemExit('--submission and --videos go together: the file to write, and the videos to label')
    for flag, paths in (('--data', [args.data] if args.data else []), ('--predict', args.predict or [])):
        for path in paths:
            if not os.path.exists(path):
                raise SystemExit(f'{flag} {path}: no such file or folder')
    for flag, path in (('--out', args.out), ('--submission', args.submission)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise SystemExit(f'{flag} {path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist')
    checkpoint, model = load_checkpoint(args.checkpoint)
    abaw = {canonical_class(name) for name in formats.AFFWILD2_CLASSES}
    strangers = [name for name in checkpoint['classes'] if canonical_class(name) not in abaw]
    if args.submission and strangers:
        raise SystemExit(f'--submission: checkpoint {args.checkpoint} has classes {", ".join(strangers)}, which are '
                         f'not Aff-Wild2 classes ({", ".join(formats.AFFWILD2_CLASSES)}); use an Aff-Wild2 model')
    return checkpoint, model


def main(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint')
    parser.add_argument('--data', help='labeled set root, or a FER2013 CSV (not needed with --predict)')
    parser.add_argument('--format', choices=formats.FORMATS, help='format of --data (default: detected from it)')
    parser.add_argument('--split', default='val', choices=('train', 'val', 'test'))
    parser.add_argument('--all-classes', action='store_true', help='predict among every class of the model, a class '
                        '--data lacks counting as wrong (default: among the classes both share)')
    parser.add_argument('--predict', nargs='+', metavar='PATH', help='label these face images or folders of them')
    parser.add_argument('--submission', metavar='FILE', help='write the ABAW submission for --videos of the '
                        'Aff-Wild2 set at --data')
    parser.add_argument('--videos', nargs='+', metavar='NAME', help='video names, or a file listing them a line each')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--out', help='metrics JSON (default: metrics_<data set>_<split>.json beside the checkpoint), '
                        'or with --predict the predictions CSV (default: predictions.csv)')
    args = parser.parse_args(argv)
    checkpoint, model = check_args(args)
    try:
        run(args, checkpoint, model)
    except (OSError, ValueError) as error:  # formats.py's errors name the file (and line) and what is wrong
        raise SystemExit(f'error: {error}') from None


def run(args, checkpoint, model):
    config, classes = checkpoint['config'], checkpoint['classes']
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model.to(device)
    amp_dtype = torch.bfloat16 if device == 'cuda' and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast('cuda', dtype=amp_dtype) if device == 'cuda' else \
        torch.autocast('cpu', enabled=False)

    def loader(items, labels):
        images = Images(items, labels, config['img_size'], config.get('grey', False))
        return data.loader(images, args.batch_size, workers=args.workers)

    def label_files(files, what_happened):
        """Class probabilities of image files, and why each could not be read ('' where it was)."""
        probs, _, unreadable = predict(model, loader(files, [0] * len(files)), device, autocast)
        report_unreadable(len(files), [file for file, why in zip(files, unreadable) if why], what_happened)
        return probs.cpu(), unreadable

    if args.predict:
        files = [f for path in args.predict for f in (pools.scan_images(path) if os.path.isdir(path) else [path])]
        out = args.out or 'predictions.csv'
        probs, unreadable = label_files(files, f'their rows in {out} say why')
        write_predictions(out, files, probs, unreadable, classes)
        print(f'labeled {unreadable.count("")} images: wrote {out}')
    if args.submission:
        found = video_frames(args.data, video_names(args.videos))
        probs, unreadable = label_files([path for _, faces in found.values() for path in faces.values()],
                                  'labeled as frames without a face')
        predicted = [None if why else label for label, why in zip(probs.argmax(dim=1).tolist(), unreadable)]
        write_submission(args.submission, found, predicted, classes)
        print(f'{len(found)} videos, {sum(count for count, _ in found.values())} frames: wrote {args.submission}')
    if args.predict or args.submission:
        return

    dataset = data.load_labeled(args.data, args.split, args.format)
    shared, outputs, absent = match_classes(dataset.classes, classes, f'--data {args.data}')
    names = [dataset.classes[k] for k in shared]
    unknown = {name: dataset.labels.count(k) for k, name in enumerate(dataset.classes) if k not in shared}
    if dataset.classes != list(classes):  # say what was matched to what, and what is left out
        matched = ', '.join(f'{name} -> {classes[i]}' for name, i in zip(names, outputs))
        print(f'classes of the set -> of the model: {matched}')
        print(f'left out {sum(unknown.values())} images of classes the model does not know: ' +
              ', '.join(f'{name} {n}' for name, n in unknown.items()) if unknown else 'no class the model lacks')
        among = 'all the model classes' if args.all_classes else f'the {len(shared)} shared ones (--all-classes: all)'
        lacks = ', '.join(classes[i] for i in absent) or 'none'
        print(f'model classes the set lacks: {lacks}; predicting among {among}')
    keep = [i for i, label in enumerate(dataset.labels) if label in shared]
    if not keep:
        raise SystemExit(f'--data {args.data}: no {args.split} images of the classes the model knows')
    items, labels = [dataset.items[i] for i in keep], [shared.index(dataset.labels[i]) for i in keep]
    others = absent if args.all_classes else []
    metrics = evaluate(model, loader(items, labels), device, names, autocast, outputs + others,
                       [classes[i] for i in others])
    # by path: an unreadable source is a file, or a (file, face box); FER2013's pixel bytes always decode
    unreadable = {items[i] if isinstance(items[i], str) else items[i][0]: why
                  for i, why in metrics.pop('unreadable', {}).items()}
    report_unreadable(len(items), list(unreadable), 'left out')
    skipped = {**dataset.skipped, **{f'class {name}, unknown to the model': n for name, n in unknown.items()},
               **({'unreadable image': len(unreadable)} if unreadable else {})}
    metrics.update(checkpoint=args.checkpoint, data=args.data, split=args.split, step=checkpoint['step'],
                   skipped=skipped, unreadable=unreadable, predictions='all' if args.all_classes else 'shared',
                   class_match=dict(zip(names, (classes[i] for i in outputs))),
                   model_classes_absent=[classes[i] for i in absent])
    print(format_table(metrics))
    name = os.path.basename(os.path.abspath(args.data))  # a folder, or a FER2013 CSV
    name = re.sub(r'[^\w.-]+', '_', os.path.splitext(name)[0] if os.path.isfile(args.data) else name)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                   f'metrics_{name}_{args.split}.json')
    with open(out, 'w') as f:
        json.dump(metrics, f, indent=1)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
