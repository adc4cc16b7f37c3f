"""
Per-class pseudo-label thresholds and acceptance rates of a training run, drawn from its log.jsonl (Pillow only).

    python plot_log.py runs/x/log.jsonl -o dtm.png

Top: the threshold T(c) of each class at each logged step. Middle: the share of the unlabeled images predicted as
class c in each logging interval whose pseudo-label was accepted (conf >= T(c)); 'all' is the overall mask rate.
An interval in which a class was never predicted has no rate: its line breaks there. Bottom: the class mix of the
accepted pseudo-labels (the share of class c among all accepted in the interval): where one line sits near 1,
self-training is feeding on one class.
"""
import argparse
import json
import math
import os

from PIL import Image, ImageDraw, ImageFont

COLOURS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#bcbd22', '#7f7f7f']
W, H, LEFT, RIGHT, TOP, GAP, BOTTOM = 1000, 960, 70, 170, 40, 60, 50  # canvas and margins, pixels


def nice_ticks(low, high, count=6):
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    raw = (high - low) / count or 1
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return [i * step for i in range(math.ceil(low / step), math.floor(high / step) + 1)]


def panel(draw, font, box, x_range, series, title):
    """Axes in box (x0, y0, x1, y1) with y in [0, 1]; series: [(colour, width, [(x, y or None), ...])]."""
    x0, y0, x1, y1 = box
    (lo, hi) = x_range
    px = lambda x: x0 + (x - lo) / ((hi - lo) or 1) * (x1 - x0)  # noqa: E731
    py = lambda y: y1 - y * (y1 - y0)  # noqa: E731
    for i in range(11):  # horizontal grid every 0.1, labels every 0.2
        draw.line([(x0, py(i / 10)), (x1, py(i / 10))], fill='#c8c8c8' if i % 5 == 0 else '#ebebeb')
        if i % 2 == 0:
            draw.text((x0 - 8, py(i / 10)), f'{i / 10:.1f}', fill='black', font=font, anchor='rm')
    for t in nice_ticks(lo, hi):
        draw.line([(px(t), y1), (px(t), y1 + 5)], fill='black')
        draw.text((px(t), y1 + 8), f'{t:g}', fill='black', font=font, anchor='mt')
    for colour, width, points in series:
        segment = []
        for x, y in points + [(None, None)]:  # a None breaks the line
            if y is None:
                if len(segment) == 1:  # a lone point: a dot
                    (x, y), = segment
                    draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
                elif segment:
                    draw.line(segment, fill=colour, width=width, joint='curve')
                segment = []
            else:
                segment.append((px(x), py(min(max(y, 0.0), 1.0))))
    draw.rectangle(box, outline='black')
    draw.text((x0, y0 - 6), title, fill='black', font=font, anchor='lb')


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('log', help='a log.jsonl written by train.py')
    parser.add_argument('-o', '--output', default='thresholds.png')
    args = parser.parse_args()
    records = read_log(args.log)
    start = next(r for r in records if r['event'] == 'start')
    # logs of an older train.py repeat on resume the steps after the checkpoint: the last record of each step wins
    train = sorted({r['step']: r for r in records if r['event'] == 'train'}.values(), key=lambda r: r['step'])
    if not train:
        raise SystemExit(f'{args.log}: no train records yet')
    classes, steps = start['classes'], [r['step'] for r in train]

    def rate(accepted, predicted):
        return accepted / predicted if predicted else None
    thresholds = [[r['thresholds'][c] for r in train] for c in range(len(classes))]
    rates = [[rate(r['accepted'][c], r['predicted'][c]) for r in train] for c in range(len(classes))]
    overall = [rate(sum(r['accepted']), sum(r['predicted'])) for r in train]
    mix = [[rate(r['accepted'][c], sum(r['accepted'])) for r in train] for c in range(len(classes))]

    image = Image.new('RGB', (W, H), 'white')
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    colours = [COLOURS[c % len(COLOURS)] for c in range(len(classes))]
    x_range = (min(0, steps[0]), steps[-1])
    height = (H - TOP - 2 * GAP - BOTTOM) // 3
    top, middle, bottom = ((LEFT, TOP + i * (height + GAP), W - RIGHT, TOP + i * (height + GAP) + height)
                           for i in range(3))
    config = start['config']
    panel(draw, font, top, x_range, [(k, 2, list(zip(steps, v))) for k, v in zip(colours, thresholds)],
          f'threshold T(c)   ({config["threshold"]}, {os.path.dirname(args.log) or "."})')
    panel(draw, font, middle, x_range, [('#404040', 1, list(zip(steps, overall)))] +
          [(k, 2, list(zip(steps, v))) for k, v in zip(colours, rates)],
          'accepted / predicted, per logging interval')
    panel(draw, font, bottom, x_range, [(k, 2, list(zip(steps, v))) for k, v in zip(colours, mix)],
          'class mix of the accepted pseudo-labels, per logging interval')
    draw.text(((LEFT + W - RIGHT) / 2, H - 12), 'step', fill='black', font=font, anchor='mb')
    # legend, right of the panels
    for i, (name, colour) in enumerate(list(zip(classes, colours)) + [('all (middle)', '#404040')]):
        y = TOP + 10 + 24 * i
        draw.line([(W - RIGHT + 15, y), (W - RIGHT + 45, y)], fill=colour, width=4 if i < len(classes) else 1)
        draw.text((W - RIGHT + 52, y), name, fill='black', font=font, anchor='lm')
    image.save(args.output)
    print(f'wrote {args.output}: {len(train)} logged steps, {len(classes)} classes')


if __name__ == '__main__':
    main()
