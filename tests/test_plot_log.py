"""plot_log.py draws the three panels from a train.py log, including a resumed run's repeated steps."""
import json
import subprocess
import sys

from PIL import Image

from tools import plot_log


def test_plot_draws_every_class(tmp_path):
    classes = ['a', 'b', 'c']
    records = [dict(event='start', step=0, classes=classes, config=dict(threshold='dtm', out='x'))]
    for step in (25, 50, 75, 50, 75, 100):  # a resume at step 50 logs 75 again: the last record wins
        records.append(dict(event='train', step=step, thresholds=[0.7, 0.7 + step / 1000, 0.9],
                            accepted=[step, 10, 0], predicted=[2 * step, 20, 5]))
    log = tmp_path / 'log.jsonl'
    log.write_text(''.join(json.dumps(r) + '\n' for r in records) + '{"event": "tra')  # cut by a crash: skipped
    out = tmp_path / 'plot.png'
    result = subprocess.run([sys.executable, plot_log.__file__, str(log), '-o', str(out)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert '4 logged steps, 3 classes' in result.stdout
    image = Image.open(out).convert('RGB')
    assert image.size == (plot_log.W, plot_log.H)
    colours = {image.getpixel((x, y)) for x in range(0, image.width, 2) for y in range(0, image.height, 2)}
    for hex_colour in plot_log.COLOURS[:3]:
        assert tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)) in colours, hex_colour


def test_a_corrupt_record_is_named_by_file_and_line(tmp_path):
    log = tmp_path / 'log.jsonl'
    log.write_text('{"event": "start", "step": 0}\n{"event": \n{"event": "end", "step": 1}\n')
    result = subprocess.run([sys.executable, plot_log.__file__, str(log)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and f'{log}:2: not a JSON record' in result.stderr
