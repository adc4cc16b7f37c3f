"""
Smoke test of tools/bench.py: a --quick run (tiny batch, one 32 px size, loader workers included) prints JSON with
every figure, and the times, rates and ratios are positive numbers.

    python -m pytest tests/test_bench.py
"""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_prints_every_figure():
    command = [sys.executable, os.path.join(ROOT, 'tools', 'bench.py'), '--quick', '--json', '--threads', '1']
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert set(results) == {'config', 'sizes', 'end_to_end', 'channels_last'}
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout
    assert (results['config']['commit'] or '').startswith(commit.strip())  # the checkout the figures come from
    (size, figures), = results['sizes'].items()
    assert size == '32'
    assert set(figures) == {'aug_batched_us', 'aug_every_image', 'aug_every_image_us', 'aug_every_image_no_graphs_us',
                            'aug_plain_us', 'aug_per_image_us', 'aug_speedup', 'decode_us', 'aug_of_step_s',
                            'aug_fraction', 'step_ours_s', 'step_plain_teacher_s', 'step_concatenated_s', 'step_ratio'}
    assert figures.pop('aug_every_image') is False  # on the CPU each operation runs on its own images
    assert all(positive(figures[key]) for key in figures)
    assert figures['aug_speedup'] == pytest.approx(figures['aug_per_image_us'] / figures['aug_batched_us'])
    (size, end), = results['end_to_end'].items()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    assert size == '32' and end['workers'] == dict(labeled=2, unlabeled=2) and end['worker_cores'] == cores
    assert all(positive(end[k]) for k in ('loader_img_s', 'loader_alone_img_s', 'memory_img_s', 'premade_img_s',
                                          'end_to_end_ratio', 'loader_alone_ratio', 'memory_ratio'))
    layout = results['channels_last']
    assert layout['size'] == 32 and layout['threads'] == 1
    assert all(positive(layout[k]) for k in ('contiguous_s', 'channels_last_s', 'ratio'))
