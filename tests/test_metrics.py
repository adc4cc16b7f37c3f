"""
Tests of evaluate.py's metrics against scikit-learn, an independent implementation of the same definitions
(macro F1 over all classes with zero_division=0 is the ABAW expression-track metric).

    python -m pytest tests/test_metrics.py
"""
import re
from contextlib import nullcontext

import pytest
import sklearn.metrics as skm
import torch

from evaluate import confusion_matrix, evaluate, format_table, metrics_from_confusion

NAMES = ('Neutral', 'Anger', 'Disgust', 'Fear', 'Happiness', 'Sadness', 'Surprise', 'Other')


def random_case(seed, num_classes, n, absent_true=(), never_predicted=()):
    """Predictions and targets that are right about half the time; some classes never occur as a target,
    some are never predicted."""
    generator = torch.Generator().manual_seed(seed)
    allowed_true = [c for c in range(num_classes) if c not in absent_true]
    allowed_pred = [c for c in range(num_classes) if c not in never_predicted]
    targets = torch.tensor(allowed_true)[torch.randint(len(allowed_true), (n,), generator=generator)]
    guess = torch.tensor(allowed_pred)[torch.randint(len(allowed_pred), (n,), generator=generator)]
    right = (torch.rand(n, generator=generator) < 0.5) & torch.isin(targets, torch.tensor(allowed_pred))
    predictions = torch.where(right, targets, guess)
    return predictions, targets


CASES = [
    dict(seed=0, num_classes=8, n=500),
    dict(seed=1, num_classes=8, n=300, absent_true=(3,), never_predicted=(5,)),
    dict(seed=2, num_classes=8, n=40, absent_true=(2, 6), never_predicted=(2, 7)),  # class 2: neither
    dict(seed=3, num_classes=7, n=1000, never_predicted=(0, 1, 2, 3, 4, 5)),        # a collapsed classifier
    dict(seed=4, num_classes=3, n=7),
    dict(seed=5, num_classes=2, n=1, absent_true=(1,)),
]


@pytest.mark.parametrize('case', CASES)
def test_confusion_matrix_matches_sklearn(case):
    predictions, targets = random_case(**case)
    C = case['num_classes']
    cm = confusion_matrix(predictions, targets, C)
    expected = skm.confusion_matrix(targets.numpy(), predictions.numpy(), labels=list(range(C)))
    assert cm.shape == (C, C)
    assert cm.tolist() == expected.tolist()


@pytest.mark.parametrize('case', CASES)
def test_metrics_match_sklearn(case):
    predictions, targets = random_case(**case)
    C = case['num_classes']
    names = NAMES[:C]
    metrics = metrics_from_confusion(confusion_matrix(predictions, targets, C), names)
    y_true, y_pred, labels = targets.numpy(), predictions.numpy(), list(range(C))

    macro = skm.f1_score(y_true, y_pred, average='macro', labels=labels, zero_division=0)
    assert metrics['macro_f1'] == pytest.approx(macro, abs=1e-12)
    assert metrics['accuracy'] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                         zero_division=0)
    assert list(metrics['per_class']) == list(names)  # every class, in order, even absent ones
    for c, name in enumerate(names):
        m = metrics['per_class'][name]
        assert m['precision'] == pytest.approx(precision[c], abs=1e-12), (name, 'precision')
        assert m['recall'] == pytest.approx(recall[c], abs=1e-12), (name, 'recall')
        assert m['f1'] == pytest.approx(f1[c], abs=1e-12), (name, 'f1')
        assert m['support'] == support[c] and isinstance(m['support'], int)
    assert metrics['confusion'] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert metrics['classes'] == list(names)


def test_metrics_by_hand():
    """A 3-class matrix worked out by hand, including a class that never occurs and is never predicted."""
    cm = torch.tensor([[3, 1, 0],    # class 0: 4 samples, 3 right, 1 predicted as 1
                       [2, 2, 0],    # class 1: 4 samples, 2 right, 2 predicted as 0
                       [0, 0, 0]])   # class 2: absent, never predicted
    metrics = metrics_from_confusion(cm, ('a', 'b', 'c'))
    # class 0: P = 3/5, R = 3/4, F1 = 2 * 3 / (5 + 4) = 2/3;  class 1: P = 2/3, R = 2/4, F1 = 4/7;  class 2: 0
    assert metrics['per_class']['a'] == pytest.approx(dict(precision=0.6, recall=0.75, f1=2 / 3, support=4))
    assert metrics['per_class']['b'] == pytest.approx(dict(precision=2 / 3, recall=0.5, f1=4 / 7, support=4))
    assert metrics['per_class']['c'] == dict(precision=0.0, recall=0.0, f1=0.0, support=0)
    assert metrics['macro_f1'] == pytest.approx((2 / 3 + 4 / 7 + 0) / 3)  # the absent class counts as 0
    assert metrics['accuracy'] == pytest.approx(5 / 8)


def test_metrics_of_an_empty_set_are_zero_not_nan():
    metrics = metrics_from_confusion(torch.zeros(3, 3, dtype=torch.long), ('a', 'b', 'c'))
    assert metrics['macro_f1'] == 0.0 and metrics['accuracy'] == 0.0


def test_confusion_matrix_accepts_any_integer_dtype_and_device_layout():
    predictions, targets = random_case(seed=7, num_classes=8, n=200)
    reference = confusion_matrix(predictions, targets, 8)
    assert torch.equal(confusion_matrix(predictions.to(torch.int32), targets.to(torch.uint8), 8), reference)
    assert reference.sum().item() == 200


def test_format_table_lists_every_class():
    predictions, targets = random_case(seed=1, num_classes=8, n=300, absent_true=(3,), never_predicted=(5,))
    metrics = metrics_from_confusion(confusion_matrix(predictions, targets, 8), NAMES)
    table = format_table(metrics)
    lines = table.splitlines()
    for name in NAMES:
        row = [line for line in lines if line.split() and line.split()[0] == name]
        assert len(row) == 1, f'{name} missing from the table:\n{table}'
        precision, recall, f1, support = row[0].split()[1:5]
        m = metrics['per_class'][name]
        assert float(precision) == pytest.approx(m['precision'], abs=5e-5)
        assert float(recall) == pytest.approx(m['recall'], abs=5e-5)
        assert float(f1) == pytest.approx(m['f1'], abs=5e-5)
        assert int(support) == m['support']
    macro = re.search(r'macro F1\s+([0-9.]+)', table)
    accuracy = re.search(r'accuracy\s+([0-9.]+)', table)
    assert macro and float(macro.group(1)) == pytest.approx(metrics['macro_f1'], abs=5e-5)
    assert accuracy and float(accuracy.group(1)) == pytest.approx(metrics['accuracy'], abs=5e-5)


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are a lookup of the first pixel of each image, a uint8 value that evaluate() normalises
    to (v / 255 - 0.5) / 0.5 before the model sees it."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer('logits', logits)

    def forward(self, images):
        return self.logits[((images[:, 0, 0, 0] * 0.5 + 0.5) * 255).round().long()]


def fixed_case(seed, n, C):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, generator=generator)
    targets = torch.randint(C - 1, (n,), generator=generator)  # class C - 1 never occurs
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4)
    loader = [(images[i:i + 16], targets[i:i + 16]) for i in range(0, n, 16)]  # a ragged last batch
    return logits, targets, loader


def test_evaluate_end_to_end_matches_sklearn():
    n, C = 90, 5
    logits, targets, loader = fixed_case(11, n, C)
    metrics = evaluate(FixedLogits(logits), loader, 'cpu', NAMES[:C], nullcontext())
    y_pred = logits.argmax(dim=1).numpy()
    assert metrics['macro_f1'] == pytest.approx(
        skm.f1_score(targets.numpy(), y_pred, average='macro', labels=list(range(C)), zero_division=0), abs=1e-12)
    assert metrics['accuracy'] == pytest.approx(skm.accuracy_score(targets.numpy(), y_pred), abs=1e-12)
    assert sum(m['support'] for m in metrics['per_class'].values()) == n


@pytest.mark.parametrize('all_classes', [False, True])
def test_evaluate_on_a_subset_of_the_model_classes_matches_sklearn(all_classes):
    """The set knows model classes 3, 0 and 4 (its classes 0, 1, 2). Shared protocol: the argmax over those three
    outputs. All classes: the argmax over all six, where predicting 1, 2 or 5 is wrong, so it lowers recall only."""
    n, shared, others = 200, [3, 0, 4], [1, 2, 5]
    logits, _, loader = fixed_case(12, n, 6)
    targets = torch.randint(3, (n,), generator=torch.Generator().manual_seed(13))
    loader = [(images, targets[i:i + 16]) for (images, _), i in zip(loader, range(0, n, 16))]
    names, other_names = ['c', 'a', 'd'], ['b', 'x', 'y']
    if all_classes:
        metrics = evaluate(FixedLogits(logits), loader, 'cpu', names, nullcontext(), shared + others, other_names)
        y_pred = [shared.index(c) if c in shared else -1 for c in logits.argmax(dim=1).tolist()]
        assert -1 in y_pred
        assert metrics['other_predictions'] == {name: (logits.argmax(dim=1) == c).sum().item()
                                                for name, c in zip(other_names, others)}
    else:
        metrics = evaluate(FixedLogits(logits), loader, 'cpu', names, nullcontext(), shared)
        y_pred = logits[:, shared].argmax(dim=1).tolist()
    y_true, labels = targets.tolist(), [0, 1, 2]
    assert metrics['macro_f1'] == pytest.approx(skm.f1_score(y_true, y_pred, labels=labels, average='macro',
                                                             zero_division=0), abs=1e-12)
    assert metrics['accuracy'] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                         zero_division=0)
    for c, name in enumerate(names):
        m = metrics['per_class'][name]
        assert (m['precision'], m['recall'], m['f1']) == pytest.approx((precision[c], recall[c], f1[c]), abs=1e-12)
        assert m['support'] == support[c]
    assert [row[:3] for row in metrics['confusion']] == skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert len(metrics['confusion'][0]) == (6 if all_classes else 3)
    if all_classes:
        assert 'predicted as classes the set lacks (wrong): b ' in format_table(metrics)


def test_unreadable_images_are_left_out_of_the_metrics():
    n, C = 40, 3
    logits, targets, loader = fixed_case(14, n, C)
    unreadable = {5, 17, 33}
    loader = [(images, labels, ['bad' if i + k in unreadable else '' for k in range(len(labels))])
              for (images, labels), i in zip(loader, range(0, n, 16))]
    metrics = evaluate(FixedLogits(logits), loader, 'cpu', NAMES[:C], nullcontext())
    read = [i for i in range(n) if i not in unreadable]
    expected = skm.confusion_matrix(targets[read].numpy(), logits[read].argmax(dim=1).numpy(), labels=list(range(C)))
    assert metrics['confusion'] == expected.tolist() and metrics['unreadable'] == {i: 'bad' for i in unreadable}
