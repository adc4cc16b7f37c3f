"""
Draw what a train.py log.jsonl says (Pillow only): one run's pseudo-label thresholds, or several runs side by side.

    python tools/plot_log.py runs/dtm/log.jsonl -o dtm.png
    python tools/plot_log.py runs/dtm/log.jsonl runs/fixmatch/log.jsonl -o compare.png --labels DTM FixMatch

One log. Top: the threshold T(c) of each class at each logged step. Middle: the share of the unlabeled images
predicted as class c in each logging interval whose pseudo-label was accepted (conf >= T(c)); 'all' is the overall
rate. An interval in which a class was never predicted has no rate: its line breaks there. Bottom: the class mix of
the accepted pseudo-labels (the share of class c among all accepted): where one line sits near 1, self-training is
feeding on one class. Where the pool's true labels are known (the built-in pool, --pool-labels), two more panels:
per class, the precision of the accepted pseudo-labels (right / accepted) and their recall (accepted / right). A
supervised log (--threshold none) has no thresholds: its learning curve is drawn instead.

Several logs, one colour per run: validation macro F1 against step (learning curves); the share of the unlabeled
batch accepted; the precision of the accepted pseudo-labels (accepted and correct / accepted); their recall (accepted
and correct / correct: the share of the correct pseudo-labels that passed the threshold); and precision against share
accepted, one line per run over training with a dot at its last step. A lower threshold moves a run to the right
(more pseudo-labels) and, if the extra ones are wrong, down. Precision and recall count only unlabeled images whose
true label is known (it is never used for training); panels without data in any log are left out.
"""
import argparse
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

COLOURS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#bcbd22', '#7f7f7f']
OVERALL = '#404040'  # the 'all classes' line of the acceptance panel
W, LEFT, RIGHT, TOP, PANEL_H, GAP, BOTTOM = 1000, 70, 170, 40, 250, 60, 50  # canvas width, margins, pixels


class Panel:
    """The axes in box (x0, y0, x1, y1): x in x_range, y in y_range. Maps data values to pixel columns and rows."""

    def __init__(self, box, x_range, y_range=(0.0, 1.0)):
        self.box, self.x_range, self.y_range = box, x_range, y_range

    def col(self, x):
        (x0, _, x1, _), (lo, hi) = self.box, self.x_range
        return x0 + (x - lo) / ((hi - lo) or 1) * (x1 - x0)

    def row(self, y):
        (_, y0, _, y1), (lo, hi) = self.box, self.y_range
        return y1 - min(max((y - lo) / (hi - lo), 0.0), 1.0) * (y1 - y0)


def nice_ticks(low, high, count=6):
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    raw = (high - low) / count or 1
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [i * step for i in range(math.ceil(low / step), math.floor(high / step) + 1)]


def draw_axes(draw, font, panel, title, x_label):
    x0, y0, x1, y1 = panel.box
    ticks = nice_ticks(*panel.y_range, count=10)  # on [0, 1]: a grid line every 0.1, labels every 0.2
    for i, t in enumerate(ticks):
        y = panel.row(t)
        draw.line([(x0, y), (x1, y)], fill='#c8c8c8' if i % 5 == 0 else '#ebebeb')
        if i % 2 == 0:
            draw.text((x0 - 8, y), f'{t:.{1 if ticks[1] - ticks[0] >= 0.1 else 2}f}', fill='black', font=font,
                      anchor='rm')
    for t in nice_ticks(*panel.x_range):
        draw.line([(panel.col(t), y1), (panel.col(t), y1 + 5)], fill='black')
        draw.text((panel.col(t), y1 + 8), f'{t:g}', fill='black', font=font, anchor='mt')
    draw.text((x1 + 8, y1 - 4), x_label, fill='black', font=font, anchor='lb')  # above the tick labels
    draw.text((x0, y0 - 6), title, fill='black', font=font, anchor='lb')


def draw_series(draw, panel, colour, width, points, end_dot=False):
    """A polyline through points [(x, y)]; a point with x or y None breaks it, and a lone point becomes a dot."""
    segment, last = [], None
    for x, y in points + [(None, None)]:
        if x is not None and y is not None:
            last = (panel.col(x), panel.row(y))
            segment.append(last)
        elif len(segment) == 1:
            (x, y), = segment
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            segment = []
        elif segment:
            draw.line(segment, fill=colour, width=width, joint='curve')
            segment = []
    if end_dot and last:
        draw.ellipse([last[0] - 5, last[1] - 5, last[0] + 5, last[1] + 5], fill=colour)


def figure(panels, legend):
    """Stack the panels that have data; panels: [(name, title, x_label, x_range, [(colour, width, points, end_dot)])],
    each y in [0, 1], or (..., series, y_range); legend: [(text, colour, width)]. Returns the image and {name: Panel},
    the geometry of what was drawn."""
    def has_data(series):
        return any(x is not None and y is not None for _, _, points, _ in series for x, y in points)
    panels = [p if len(p) == 6 else (*p, (0.0, 1.0)) for p in panels if has_data(p[4])]
    height = TOP + len(panels) * (PANEL_H + GAP) - GAP + BOTTOM
    image = Image.new('RGB', (W, height), 'white')
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=14)
    drawn = {}
    for i, (name, title, x_label, x_range, series, y_range) in enumerate(panels):
        y0 = TOP + i * (PANEL_H + GAP)
        panel = drawn[name] = Panel((LEFT, y0, W - RIGHT, y0 + PANEL_H), x_range, y_range)
        draw_axes(draw, font, panel, title, x_label)
        for colour, width, points, end_dot in series:
            draw_series(draw, panel, colour, width, points, end_dot)
        draw.rectangle(panel.box, outline='black')
    for i, (text, colour, width) in enumerate(legend):  # right of the panels
        y = TOP + 10 + 24 * i
        draw.line([(W - RIGHT + 15, y), (W - RIGHT + 45, y)], fill=colour, width=width)
        draw.text((W - RIGHT + 52, y), text, fill='black', font=font, anchor='lm')
    return image, drawn


def read_log(path):
    """The records of a log.jsonl. Its last line may be cut (a run killed mid-write, or still writing): skipped."""
    lines = [(number, line) for number, line in enumerate(open(path), 1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number != lines[-1][0]:
                raise SystemExit(f'{path}:{number}: not a JSON record ({error})')
    return records


def last_per_step(records, event):
    # logs of an older train.py repeat on resume the steps after the checkpoint: the last record of each step wins
    return sorted({r['step']: r for r in records if r.get('event') == event}.values(), key=lambda r: r['step'])


def known(record):
    """Whether a train record counts pseudo-labels against the pool's true labels."""
    return 'accepted_correct' in record


def ratio(part, whole):
    return part / whole if whole else None  # an interval with nothing to count has no rate: the line breaks


def draw_thresholds(records, name):
    """One semi-supervised run: thresholds, acceptance and class mix of the accepted, per class. None if it has none."""
    train = [r for r in last_per_step(records, 'train') if 'thresholds' in r]
    if not train:
        return None
    start = next((r for r in records if r.get('event') == 'start'), {})
    classes = start.get('classes') or [str(c) for c in range(len(train[0]['thresholds']))]
    steps, colours = [r['step'] for r in train], [COLOURS[c % len(COLOURS)] for c in range(len(classes))]

    def per_class(value):  # one line per class, value(record, c) at each step
        return [(k, 2, [(s, value(r, c)) for s, r in zip(steps, train)], False) for c, k in enumerate(colours)]
    overall = [(s, ratio(sum(r['accepted']), sum(r['predicted']))) for s, r in zip(steps, train)]
    x_range = (min(0, steps[0]), steps[-1])
    method = start.get('config', {}).get('threshold', '?')
    image, panels = figure([
        ('thresholds', f'threshold T(c)   ({method}, {name})', 'step', x_range,
         per_class(lambda r, c: r['thresholds'][c])),
        ('acceptance', 'accepted / predicted, per logging interval', 'step', x_range,
         [(OVERALL, 1, overall, False)] + per_class(lambda r, c: ratio(r['accepted'][c], r['predicted'][c]))),
        ('mix', 'class mix of the accepted pseudo-labels, per logging interval', 'step', x_range,
         per_class(lambda r, c: ratio(r['accepted'][c], sum(r['accepted'])))),
        ('precision', 'precision of the accepted pseudo-labels: right / accepted, per logging interval', 'step',
         x_range,
         per_class(lambda r, c: ratio(r['accepted_correct'][c], r['accepted_labeled'][c]) if known(r) else None)),
        ('recall', 'recall: accepted / right pseudo-labels, per logging interval', 'step', x_range,
         per_class(lambda r, c: ratio(r['accepted_correct'][c], r['correct'][c]) if known(r) else None))],
        [(c, k, 4) for c, k in zip(classes, colours)] + [('all (middle)', OVERALL, 1)])
    return image, panels, f'{len(train)} logged steps, {len(classes)} classes'


def curves(records):
    """One run's curves {name: [(x, y or None)]}: macro F1, share accepted, precision and recall against step, and
    precision against share accepted. A key the log lacks (a supervised run, an unknown true label) gives no points."""
    train = last_per_step(records, 'train')
    accepted = {r['step']: r['mask'] if 'mask' in r else ratio(sum(r['accepted']), sum(r['predicted']))
                for r in train if 'mask' in r or 'accepted' in r}
    known = [r for r in train if 'accepted_correct' in r]
    precision = {r['step']: ratio(sum(r['accepted_correct']), sum(r['accepted_labeled'])) for r in known}
    return dict(macro_f1=[(r['step'], r['macro_f1']) for r in last_per_step(records, 'eval') if 'macro_f1' in r],
                accepted=list(accepted.items()), precision=list(precision.items()),
                recall=[(r['step'], ratio(sum(r['accepted_correct']), sum(r['correct']))) for r in known],
                quantity_quality=[(accepted.get(s), p) for s, p in precision.items()])


def draw_runs(logs, labels):
    """Several runs, one colour each: learning curves and pseudo-label quality (panels without data are left out)."""
    runs = [curves(records) for records in logs]
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(runs))]
    steps = [x for run in runs for name in ('macro_f1', 'accepted') for x, _ in run[name]]
    x_range = (min([0] + steps), max(steps, default=1))

    def lines(name, end_dot=False):
        return [(k, 2, run[name], end_dot) for k, run in zip(colours, runs)]
    # the learning curves on the tenths their values span, so that runs a point apart can be told apart
    f1 = [y for run in runs for _, y in run['macro_f1']] or [0.0, 1.0]
    f1_range = (max(0.0, math.ceil(round(min(f1) * 10, 6)) / 10 - 0.1),
                min(1.0, math.floor(round(max(f1) * 10, 6)) / 10 + 0.1))
    image, panels = figure([
        ('macro_f1', 'validation macro F1 (learning curves)', 'step', x_range, lines('macro_f1'), f1_range),
        ('accepted', 'share of the unlabeled batch accepted (conf >= T)', 'step', x_range, lines('accepted')),
        ('precision', 'precision of the accepted pseudo-labels: correct / accepted', 'step', x_range,
         lines('precision')),
        ('recall', 'recall: accepted / correct pseudo-labels', 'step', x_range, lines('recall')),
        ('quantity_quality', 'precision (y) against share accepted (x) over training; dot: last step',
         'share accepted', (0, 1), lines('quantity_quality', end_dot=True))],
        [(label, k, 4) for label, k in zip(labels, colours)])
    return image, panels, f'{len(runs)} run{"s" * (len(runs) > 1)}, panels: {", ".join(panels) or "none"}'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('logs', nargs='+', help='log.jsonl files written by train.py: one, or several to compare')
    parser.add_argument('-o', '--output', help='the PNG to write (default thresholds.png, or compare.png)')
    parser.add_argument('--labels', nargs='+', help='a legend name per log (default: the folder of each log)')
    args = parser.parse_args()
    for path in args.logs:
        if not os.path.isfile(path):
            raise SystemExit(f'{path}: no such log file; give the log.jsonl in a run folder of train.py')
    if args.labels and len(args.labels) != len(args.logs):
        raise SystemExit(f'--labels: {len(args.labels)} names for {len(args.logs)} logs; give one name per log')
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.logs]
    if len(set(labels)) < len(labels):  # two runs in folders of the same name: the paths tell them apart
        labels = args.logs
    logs = [read_log(path) for path in args.logs]
    if len(logs) == 1 and not last_per_step(logs[0], 'train'):
        raise SystemExit(f'{args.logs[0]}: no train records yet')
    drawn = draw_thresholds(logs[0], os.path.dirname(args.logs[0]) or '.') if len(logs) == 1 else None
    if len(logs) == 1 and drawn is None:
        print(f'{args.logs[0]}: no pseudo-label thresholds (a supervised run): drawing its learning curve instead')
    image, panels, summary = drawn or draw_runs(logs, labels)
    if not panels:
        raise SystemExit(f'{", ".join(args.logs)}: nothing to draw yet (no eval records, no pseudo-label counts)')
    output = args.output or ('thresholds.png' if drawn else 'compare.png')
    image.save(output)
    print(f'wrote {output}: {summary}')


if __name__ == '__main__':
    main()
