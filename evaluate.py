"""
Evaluation and prediction with a saved checkpoint, which carries the class names, architecture and input size.

    python evaluate.py runs/default/best.pt --data data/faces --split val     # metrics table, metrics.json
    python evaluate.py best.pt --data Aff-Wild2/ --submission sub.csv --videos test_videos.txt
    python evaluate.py best.pt --predict photos/ face.jpg --out predictions.csv

Metrics: confusion matrix, per-class precision / recall / F1, macro F1 and accuracy, in torch. On Aff-Wild2 the macro
F1 over its 8 classes on the annotated frames is the ABAW expression-track metric. --submission writes the ABAW
file: a label for every frame of each video, frames without a face image taking the nearest face frame's label.
--predict labels face images (files, or folders of them) that have no labels: a CSV of file, predicted class and
class probabilities.
"""
import argparse
import csv
import json
import os

import torch
import torch.distributed as dist

import data
from sources import formats, pools
from model import build_model


def confusion_matrix(predictions, targets, num_classes):
    """cm[i, j] = number of samples of true class i predicted as class j."""
    index = targets.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm, class_names):
    """Precision_c = TP/(TP+FP), recall_c = TP/(TP+FN), F1_c = 2PR/(P+R) (0 where undefined, as scikit-learn's
    zero_division=0); macro F1 = mean_c F1_c over all classes; accuracy = trace/total."""
    cm = cm.double()
    tp = cm.diag()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * tp / (cm.sum(0) + cm.sum(1)).clamp(min=1)  # = 2PR/(P+R), and 0 when TP = 0
    return dict(macro_f1=f1.mean().item(), accuracy=(tp.sum() / cm.sum().clamp(min=1)).item(),
                per_class={name: dict(precision=p, recall=r, f1=f, support=int(s)) for name, p, r, f, s in
                           zip(class_names, precision.tolist(), recall.tolist(), f1.tolist(), cm.sum(1).tolist())},
                confusion=cm.long().tolist(), classes=list(class_names))


@torch.no_grad()
def predict(model, loader, device, autocast):
    """Class probabilities and labels for every batch of (images, labels) in loader."""
    model.eval()
    probs, labels = [], []
    for images, targets in loader:
        with autocast:
            logits = model(images.to(device, non_blocking=True))
        probs.append(logits.float().softmax(dim=1))
        labels.append(torch.as_tensor(targets).to(device))
    return torch.cat(probs), torch.cat(labels)


def evaluate(model, loader, device, class_names, autocast):
    """Metrics over the loader's samples; under torch.distributed each rank holds a disjoint shard and the
    confusion matrices are summed, so the metrics cover the whole set exactly once."""
    probs, labels = predict(model, loader, device, autocast)
    cm = confusion_matrix(probs.argmax(dim=1), labels, len(class_names))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm)
    return metrics_from_confusion(cm.cpu(), class_names)


def format_table(metrics):
    lines = [f'{"class":<12} {"precision":>9} {"recall":>7} {"f1":>7} {"support":>8}']
    for name, m in metrics['per_class'].items():
        lines.append(f'{name:<12} {m["precision"]:9.4f} {m["recall"]:7.4f} {m["f1"]:7.4f} {m["support"]:8d}')
    lines.append(f'macro F1 {metrics["macro_f1"]:.4f}   accuracy {metrics["accuracy"]:.4f}')
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# labeling images that have no labels: --predict, and the ABAW --submission


def predict_sources(model, sources, config, device, autocast, batch_size, workers):
    """Class probabilities [N, C] (on the CPU) for image sources, anything formats.open_image reads, in order."""
    images = data.LabeledSet(sources, [0] * len(sources), [], 'images to label')  # labels unused by predict()
    images.view = data.Augment(config['img_size'], config.get('grey', False)).eval_view
    return predict(model, data.loader(images, batch_size, workers=workers), device, autocast)[0].cpu()


def write_predictions(path, files, probs, classes):
    with open(path, 'w', newline='') as f:
        out = csv.writer(f)
        out.writerow(['file', 'prediction', *classes])
        for file, label, p in zip(files, probs.argmax(dim=1).tolist(), probs.tolist()):
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
        raise SystemExit(f'{root}: no Aff-Wild2 cropped_aligned/ folder')
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
            raise SystemExit(f'video {video}: no face images in {folder}')
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
    """The ABAW expression-track file: its header, then `video/00001.jpg,label` for every frame of every video."""
    if not set(classes) <= set(formats.AFFWILD2_CLASSES):
        raise SystemExit(f'the checkpoint classes {classes} are not Aff-Wild2 classes {formats.AFFWILD2_CLASSES}')
    to_abaw = [formats.AFFWILD2_CLASSES.index(name) for name in classes]  # a checkpoint's order may differ
    predicted = iter(predicted)
    with open(path, 'w') as f:
        f.write('image_location,' + ','.join(formats.AFFWILD2_CLASSES) + '\n')
        for video, (count, faces) in found.items():
            labels = nearest_fill({frame: to_abaw[next(predicted)] for frame in faces}, count)
            f.writelines(f'{video}/{frame:05d}.jpg,{label}\n' for frame, label in enumerate(labels, 1))


# -----------------------------------------------------------------------------
# the command line: evaluate (default), --predict, --submission


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint')
    parser.add_argument('--data', help='labeled set root, or a FER2013 CSV (not needed with --predict)')
    parser.add_argument('--format', choices=formats.FORMATS, help='format of --data (default: detected from it)')
    parser.add_argument('--split', default='val')
    parser.add_argument('--predict', nargs='+', metavar='PATH', help='label these face images or folders of them')
    parser.add_argument('--submission', metavar='FILE', help='write the ABAW submission for --videos of the '
                        'Aff-Wild2 set at --data')
    parser.add_argument('--videos', nargs='+', metavar='NAME', help='video names, or a file listing them a line each')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--out', help='metrics JSON (default: metrics.json beside the checkpoint), or with --predict '
                        'the predictions CSV (default: predictions.csv)')
    args = parser.parse_args(argv)
    if not args.data and not args.predict:
        parser.error('--data is required, unless --predict')
    if args.submission and not args.videos:
        parser.error('--submission needs --videos')

    checkpoint = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
    config, classes = checkpoint['config'], checkpoint['classes']
    model = build_model(config['arch'], len(classes))
    model.load_state_dict(checkpoint['ema_model'])
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model.to(device)
    amp_dtype = torch.bfloat16 if device == 'cuda' and torch.cuda.is_bf16_supported() else torch.float16
    autocast = torch.autocast('cuda', dtype=amp_dtype) if device == 'cuda' else \
        torch.autocast('cpu', enabled=False)

    def run(sources):
        return predict_sources(model, sources, config, device, autocast, args.batch_size, args.workers)

    if args.predict:
        missing = [path for path in args.predict if not os.path.exists(path)]
        if missing:
            raise SystemExit(f'--predict: no such file or folder: {", ".join(missing)}')
        files = [f for path in args.predict for f in (pools.scan_images(path) if os.path.isdir(path) else [path])]
        out = args.out or 'predictions.csv'
        write_predictions(out, files, run(files), classes)
        print(f'labeled {len(files)} images: wrote {out}')
    if args.submission:
        found = video_frames(args.data, video_names(args.videos))
        probs = run([path for _, faces in found.values() for path in faces.values()])
        write_submission(args.submission, found, probs.argmax(dim=1).tolist(), classes)
        print(f'{len(found)} videos, {sum(count for count, _ in found.values())} frames: wrote {args.submission}')
    if args.predict or args.submission:
        return

    dataset = data.load_labeled(args.data, args.split, args.format)
    if dataset.classes != classes:
        raise SystemExit(f'{args.data} has classes {dataset.classes}, the checkpoint was trained on {classes}')
    dataset.view = data.Augment(config['img_size'], config.get('grey', False)).eval_view
    loader = data.loader(dataset, args.batch_size, workers=args.workers)
    metrics = evaluate(model, loader, device, classes, autocast)
    metrics.update(checkpoint=args.checkpoint, data=args.data, split=args.split, step=checkpoint['step'],
                   skipped=dataset.skipped)
    print(format_table(metrics))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), 'metrics.json')
    with open(out, 'w') as f:
        json.dump(metrics, f, indent=1)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
