"""plot_log.py draws what the log says: each line's pixels sit at the height of its logged value in its panel."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from tools import plot_log

TOLERANCE = 3  # pixels: a line is 2 wide and values map to fractional rows


def rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def pixels(image, panel, colour):
    """The (x, y) inside the panel's frame whose colour is exactly `colour` (lines are drawn without antialiasing)."""
    x0, y0, x1, y1 = (round(v) for v in panel.box)
    data, target = image.load(), rgb(colour)
    return {(x, y) for x in range(x0 + 1, x1) for y in range(y0 + 1, y1) if data[x, y] == target}


def assert_level(image, panel, colour, value, first_step, last_step):
    """A horizontal line of `colour` at `value` from first_step to last_step, and nothing of that colour elsewhere."""
    found = pixels(image, panel, colour)
    assert found, f'no pixel of {colour} in the panel'
    rows, cols = {y for _, y in found}, {x for x, _ in found}
    assert all(abs(y - panel.row(value)) <= TOLERANCE for y in rows), (colour, value, panel.row(value), sorted(rows))
    assert abs(min(cols) - panel.col(first_step)) <= TOLERANCE and abs(max(cols) - panel.col(last_step)) <= TOLERANCE


def write_log(path, records, cut=False):
    path.write_text(''.join(json.dumps(r) + '\n' for r in records) + ('{"event": "tra' if cut else ''))
    return path


def start(classes=('a', 'b'), threshold='dtm'):
    return dict(event='start', step=0, classes=list(classes), config=dict(threshold=threshold))


def semi_log(steps=range(100, 1001, 100)):
    """Class 0: T 0.2, 10 of 20 predictions accepted (rate 0.5, mix 10/40); class 1: T 0.8, 30 of 100 (0.3, 30/40)."""
    return [start()] + [dict(event='train', step=s, mask=0.4, thresholds=[0.2, 0.8], accepted=[10, 30],
                             predicted=[20, 100]) for s in steps]


def test_one_log_draws_each_class_at_its_threshold_rate_and_share():
    image, panels, summary = plot_log.draw_thresholds(semi_log(), 'run')
    assert summary == '10 logged steps, 2 classes' and set(panels) == {'thresholds', 'acceptance', 'mix'}
    class_0, class_1 = plot_log.COLOURS[:2]
    thresholds = panels['thresholds']
    x0, y0, x1, y1 = thresholds.box  # the geometry the checks use: y 0 at the bottom edge, 1 at the top, steps across
    assert (thresholds.row(0), thresholds.row(1), thresholds.col(0), thresholds.col(1000)) == (y1, y0, x0, x1)
    assert_level(image, thresholds, class_0, 0.2, 100, 1000)
    assert_level(image, thresholds, class_1, 0.8, 100, 1000)
    assert not any(abs(y - thresholds.row(0.8)) <= 10 for _, y in pixels(image, thresholds, class_0))
    assert not any(abs(y - thresholds.row(0.2)) <= 10 for _, y in pixels(image, thresholds, class_1))
    assert_level(image, panels['acceptance'], class_0, 10 / 20, 100, 1000)
    assert_level(image, panels['acceptance'], class_1, 30 / 100, 100, 1000)
    assert_level(image, panels['acceptance'], plot_log.OVERALL, 40 / 120, 100, 1000)
    assert_level(image, panels['mix'], class_0, 10 / 40, 100, 1000)
    assert_level(image, panels['mix'], class_1, 30 / 40, 100, 1000)


def test_a_line_follows_the_logged_steps():
    records = semi_log()
    for r in records[1:]:
        r['thresholds'] = [0.2 if r['step'] <= 500 else 0.6, 0.9]
    image, panels, _ = plot_log.draw_thresholds(records, 'run')
    panel = panels['thresholds']
    found = pixels(image, panel, plot_log.COLOURS[0])
    for step, value in ((300, 0.2), (800, 0.6)):
        column = [y for x, y in found if abs(x - panel.col(step)) <= 1]
        assert column and all(abs(y - panel.row(value)) <= TOLERANCE for y in column), (step, value, column)


@pytest.mark.parametrize('broken', ['nothing drawn', 'upside down'])
def test_the_pixel_check_fails_on_a_broken_drawing(monkeypatch, broken):
    draw_series = plot_log.draw_series

    def broken_draw(draw, panel, colour, width, points, end_dot=False):
        if broken == 'upside down':
            draw_series(draw, panel, colour, width, [(x, 1 - y) for x, y in points], end_dot)
    monkeypatch.setattr(plot_log, 'draw_series', broken_draw)
    image, panels, _ = plot_log.draw_thresholds(semi_log(), 'run')
    with pytest.raises(AssertionError):
        assert_level(image, panels['thresholds'], plot_log.COLOURS[0], 0.2, 100, 1000)


def quality_log(f1, shares, accepted_correct, accepted_labeled, correct):
    """A semi-supervised run whose unlabeled pool has known true labels, logged at steps 100, 200, ..."""
    records = [start()]
    for i, share in enumerate(shares):
        step = 100 * (i + 1)
        records.append(dict(event='train', step=step, mask=share, thresholds=[0.9, 0.9], accepted=[5, 5],
                            predicted=[10, 10], labeled=[10, 10], accepted_labeled=accepted_labeled,
                            accepted_correct=accepted_correct, correct=correct))
        records.append(dict(event='eval', step=step, macro_f1=f1, accuracy=f1))
    return records


def test_comparison_draws_each_run_at_its_values():
    shares = [0.60, 0.65, 0.70, 0.75, 0.80]
    run_a = quality_log(0.3, shares, accepted_correct=[3, 3], accepted_labeled=[5, 5], correct=[4, 8])
    run_b = quality_log(0.7, [0.2] * 5, accepted_correct=[9, 0], accepted_labeled=[10, 0], correct=[10, 20])
    image, panels, _ = plot_log.draw_runs([run_a, run_b], ['A', 'B'])
    assert list(panels) == ['macro_f1', 'accepted', 'precision', 'recall', 'quantity_quality']
    colour_a, colour_b = plot_log.COLOURS[:2]
    assert_level(image, panels['macro_f1'], colour_a, 0.3, 100, 500)
    assert_level(image, panels['macro_f1'], colour_b, 0.7, 100, 500)
    assert_level(image, panels['accepted'], colour_b, 0.2, 100, 500)
    accepted = pixels(image, panels['accepted'], colour_a)
    for i, share in enumerate(shares):  # a rising line: at each step, at that step's share
        column = [y for x, y in accepted if abs(x - panels['accepted'].col(100 * (i + 1))) <= 1]
        assert column and all(abs(y - panels['accepted'].row(share)) <= TOLERANCE for y in column)
    assert_level(image, panels['precision'], colour_a, 6 / 10, 100, 500)
    assert_level(image, panels['precision'], colour_b, 9 / 10, 100, 500)
    assert_level(image, panels['recall'], colour_a, 6 / 12, 100, 500)
    assert_level(image, panels['recall'], colour_b, 9 / 30, 100, 500)
    # quantity against quality: run A moves right along precision 0.6 from share 0.6 to 0.8 and ends in a dot there
    panel = panels['quantity_quality']
    found_a = pixels(image, panel, colour_a)
    assert all(abs(y - panel.row(0.6)) <= 5 for _, y in found_a)  # the end dot has a radius of 5
    assert abs(min(x for x, _ in found_a) - panel.col(0.6)) <= TOLERANCE
    assert abs(max(x for x, _ in found_a) - panel.col(0.8)) <= 5 + 1
    found_b = pixels(image, panel, colour_b)  # run B stays at one point: its dot
    assert found_b and all(abs(x - panel.col(0.2)) <= 5 + 1 and abs(y - panel.row(0.9)) <= 5 + 1 for x, y in found_b)


def test_panels_without_data_are_left_out():
    supervised = [start(threshold='none'), dict(event='train', step=100, loss_s=1.0),
                  dict(event='eval', step=100, macro_f1=0.5)]
    image, panels, _ = plot_log.draw_runs([supervised, semi_log()], ['sup', 'semi'])
    assert list(panels) == ['macro_f1', 'accepted']  # no precision or recall: no true labels in either log
    assert_level(image, panels['accepted'], plot_log.COLOURS[1], 0.4, 100, 1000)
    assert not pixels(image, panels['accepted'], plot_log.COLOURS[0])  # the supervised run accepts nothing


def test_learning_curves_a_point_apart_are_told_apart():
    """The learning-curve panel spans the tenths its values fall in, not [0, 1]: runs one macro-F1 point apart are
    drawn well apart."""
    logs = [[start(threshold='none'), dict(event='train', step=100, loss_s=1.0), dict(event='train', step=300,
             loss_s=1.0), dict(event='eval', step=100, macro_f1=f1), dict(event='eval', step=300, macro_f1=f1)]
            for f1 in (0.40, 0.41)]
    image, panels, _ = plot_log.draw_runs(logs, ['a', 'b'])
    panel = panels['macro_f1']
    assert panel.y_range == pytest.approx((0.3, 0.5))
    for colour, f1 in zip(plot_log.COLOURS, (0.40, 0.41)):
        assert_level(image, panel, colour, f1, 100, 300)
    assert panel.row(0.40) - panel.row(0.41) >= 10  # pixels; on [0, 1] the same panel would give 2.5


def run_cli(*args):
    return subprocess.run([sys.executable, plot_log.__file__, *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def test_a_supervised_log_draws_its_learning_curve(tmp_path):
    records = [start(threshold='none')]
    for step in (100, 200, 300):
        records += [dict(event='train', step=step, loss_s=1.0, lr=0.03), dict(event='eval', step=step, macro_f1=0.45)]
    log, out = write_log(tmp_path / 'log.jsonl', records), tmp_path / 'sup.png'
    result = run_cli(log, '-o', out)
    assert result.returncode == 0, result.stderr
    assert 'no pseudo-label thresholds' in result.stdout and 'panels: macro_f1' in result.stdout
    _, panels, _ = plot_log.draw_runs([records], ['run'])  # the same figure: its geometry
    assert_level(Image.open(out).convert('RGB'), panels['macro_f1'], plot_log.COLOURS[0], 0.45, 100, 300)


def test_a_resumed_and_cut_log(tmp_path):
    records = [start(classes='abc')]
    for step, t in ((25, 0.3), (50, 0.3), (75, 0.9), (50, 0.3), (75, 0.3), (100, 0.3)):  # resumed at 50: 75 again
        records.append(dict(event='train', step=step, thresholds=[t, 0.5, 0.7], accepted=[1, 1, 1],
                            predicted=[2, 2, 2]))
    log = write_log(tmp_path / 'log.jsonl', records, cut=True)  # killed mid-write: the cut line is skipped
    assert plot_log.read_log(log) == records
    out = tmp_path / 'plot.png'
    result = run_cli(log, '-o', out)
    assert result.returncode == 0, result.stderr
    assert '4 logged steps, 3 classes' in result.stdout
    _, panels, _ = plot_log.draw_thresholds(plot_log.read_log(log), str(tmp_path))
    image = Image.open(out).convert('RGB')
    for colour, value in zip(plot_log.COLOURS, (0.3, 0.5, 0.7)):  # the last record of step 75 wins: 0.3, not 0.9
        assert_level(image, panels['thresholds'], colour, value, 25, 100)


def test_the_cli_compares_logs_with_labels(tmp_path):
    logs = []
    for name, f1 in (('dtm', 0.3), ('fixmatch', 0.6)):
        (tmp_path / name).mkdir()
        logs.append(write_log(tmp_path / name / 'log.jsonl', quality_log(f1, [0.5] * 3, [1, 1], [2, 2], [2, 2])))
    result = run_cli(*logs, '-o', tmp_path / 'compare.png', '--labels', 'DTM', 'FixMatch')
    assert result.returncode == 0, result.stderr
    assert '2 runs, panels: macro_f1, accepted, precision, recall, quantity_quality' in result.stdout
    assert Image.open(tmp_path / 'compare.png').height == plot_log.TOP + 5 * (plot_log.PANEL_H + plot_log.GAP) - \
        plot_log.GAP + plot_log.BOTTOM


def test_user_errors_are_one_line(tmp_path):
    log = tmp_path / 'log.jsonl'
    log.write_text('{"event": "start", "step": 0}\n{"event": \n{"event": "end", "step": 1}\n')
    for args, message in (((log,), f'{log}:2: not a JSON record'),
                          ((tmp_path / 'missing.jsonl',), 'missing.jsonl: no such log file'),
                          ((log, log, '--labels', 'one'), '--labels: 1 names for 2 logs')):
        result = run_cli(*args)
        assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr, args


def test_one_log_with_true_labels_draws_precision_and_recall_per_class():
    """Class 0: 8 right of 10 accepted (precision 0.8), of 16 right (recall 0.5); class 1: 6 of 30, of 24."""
    records = semi_log()
    for r in records[1:]:
        r.update(labeled=[20, 100], accepted_labeled=[10, 30], accepted_correct=[8, 6], correct=[16, 24])
    image, panels, _ = plot_log.draw_thresholds(records, 'run')
    assert set(panels) == {'thresholds', 'acceptance', 'mix', 'precision', 'recall'}
    class_0, class_1 = plot_log.COLOURS[:2]
    assert_level(image, panels['precision'], class_0, 0.8, 100, 1000)
    assert_level(image, panels['precision'], class_1, 0.2, 100, 1000)
    assert_level(image, panels['recall'], class_0, 0.5, 100, 1000)
    assert_level(image, panels['recall'], class_1, 0.25, 100, 1000)
