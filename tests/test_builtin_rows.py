"""experiments/builtin/run.py: each run becomes one row of results.json (the best checkpoint's macro F1, accuracy and
predicted share per class), a rerun replaces its row, and the table counts a run whose model stopped predicting a
class as collapsed."""
import json
import os
import subprocess
import sys

from sources.faces import generate_faces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
SCRIPT = os.path.join(ROOT, 'experiments', 'builtin', 'run.py')


def test_rows_record_each_run_and_the_table_reads_them(tmp_path):
    faces = str(tmp_path / 'faces')
    generate_faces(faces, counts=(16, 16, 16), identities=(2, 2, 2))
    results = str(tmp_path / 'results.json')
    extra = f'--steps 2 --eval-every 1 --batch-size 4 --mu 2 --img-size 32 --data {faces} --unlabeled {faces}/unlabeled'
    for _ in range(2):  # the second time replaces the rows of the first
        done = subprocess.run([sys.executable, SCRIPT, 'rows', '--seeds', '0', '--methods', 'supervised', 'DTM',
                               '--runs', str(tmp_path / 'runs'), '--results', results, '--extra', extra],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    rows = json.load(open(results))
    assert sorted((r['method'], r['seed']) for r in rows) == [('DTM', 0), ('supervised', 0)]
    for row in rows:
        log = [json.loads(line) for line in open(tmp_path / 'runs' / f'{row["method"]}_s0' / 'log.jsonl')]
        best = max((r for r in log if r['event'] == 'eval'), key=lambda r: r['macro_f1'])
        assert row['macro_f1'] == best['macro_f1'] and row['accuracy'] == best['accuracy']
        assert abs(sum(row['predicted_share'].values()) - 1) < 1e-9 and len(row['predicted_share']) == 8
    rows[0]['predicted_share'] = dict.fromkeys(rows[0]['predicted_share'], 0.0) | {'Neutral': 1.0}  # one class
    rows[1]['predicted_share'] = dict.fromkeys(rows[1]['predicted_share'], 1 / 8)  # every class alike
    json.dump(rows, open(results, 'w'))
    table = subprocess.run([sys.executable, SCRIPT, 'table', '--results', results], capture_output=True, text=True,
                           timeout=60).stdout
    lines = {line.split(' | ')[0][2:]: line for line in table.splitlines()[2:]}
    commit = rows[0]['commit']
    assert lines[rows[0]['method']].endswith(f'| 0.000 | 1 of 1 | {rows[0]["minutes"]:.1f} | {commit} |')
    assert lines[rows[1]['method']].endswith(f'| 0.125 | 0 of 1 | {rows[1]["minutes"]:.1f} | {commit} |')


def test_the_readme_table_is_the_table_of_the_committed_results():
    """The README's built-in table is what `run.py table` makes of experiments/builtin/results/results.json."""
    table = subprocess.run([sys.executable, SCRIPT, 'table'], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    with open(os.path.join(ROOT, 'README.md')) as f:
        assert table.stdout.strip() in f.read()
