"""
Smoke test of bench.py: a --quick run (tiny batch, one 32 px size, loader workers included) prints JSON with every
figure, and the times, rates and ratios are positive numbers.

    python -m pytest test_bench.py
"""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_prints_every_figure():
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--quick', '--json', '--threads', '1'],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert set(results) == {'config', 'sizes', 'end_to_end'}
    (size, figures), = results['sizes'].items()
    assert size == '32'
    for key in ('step_ours_s', 'step_concatenated_s', 'step_ratio', 'labeled_img_s', 'unlabeled_img_s',
                'randaugment_pil_over_tensor'):
        assert positive(figures[key]), key
    stages = figures['us_per_unlabeled']
    assert set(stages) == {'read', 'decode', 'weak x2', 'randaugment', 'normalize x2', 'cutout', 'rest', 'collate'}
    assert all(positive(stages[k]) for k in stages if k != 'rest')  # rest is a difference: it may be about 0
    end = results['end_to_end']
    assert end['size'] == 32 and end['workers'] == 2
    assert all(positive(end[k]) for k in ('loader_img_s', 'premade_img_s', 'ratio'))
