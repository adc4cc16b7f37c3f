"""
Evaluation: confusion matrix, per-class precision / recall / F1, macro F1 (the ABAW metric) and accuracy, in torch.

    python evaluate.py runs/default/best.pt --data data/faces --split val
evaluates a saved checkpoint on its own (the checkpoint carries the class names, architecture and input size),
prints a table and writes metrics.json beside the checkpoint (or to --out).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist


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


def main():
    import data
    from model import build_model
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint')
    parser.add_argument('--data', required=True, help='labeled dataset root')
    parser.add_argument('--split', default='val')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--out', help='metrics JSON file (default: metrics.json beside the checkpoint)')
    args = parser.parse_args()

    checkpoint = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
    config, classes = checkpoint['config'], checkpoint['classes']
    model = build_model(config['arch'], len(classes))
    model.load_state_dict(checkpoint['ema_model'])
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model.to(device)
    dataset = data.load_labeled(args.data, args.split)
    if dataset.classes != classes:
        raise SystemExit(f'{args.data} has classes {dataset.classes}, the checkpoint was trained on {classes}')
    dataset.view = data.Augment(config['img_size']).eval_view
    loader = data.loader(dataset, args.batch_size, workers=args.workers)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if device == 'cuda' else torch.autocast('cpu', enabled=False)
    metrics = evaluate(model, loader, device, classes, autocast)
    metrics.update(checkpoint=args.checkpoint, data=args.data, split=args.split, step=checkpoint['step'])
    print(format_table(metrics))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), 'metrics.json')
    with open(out, 'w') as f:
        json.dump(metrics, f, indent=1)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
