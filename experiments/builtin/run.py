"""
The built-in task's rows: supervised, FixMatch and the DTM (or variants) over seeds, run with the default settings,
and the README's table made from what they wrote.

    python experiments/builtin/run.py rows [--seeds 0 1 2 3 4 5] [--methods supervised FixMatch DTM] [--parallel 2]
    python experiments/builtin/run.py table          # the Markdown table of results.json, per method over seeds

`rows` runs `python train.py` once per method and seed (one thread each, --parallel at a time) into RUNS/<method>_sS
and writes a row per run into results/results.json, replacing a row of the same method and seed: {method, seed,
macro_f1, accuracy, predicted_share (per class, at the best checkpoint), minutes, commit, command}. A method is one
of METHODS or NAME=FLAGS for a variant (`--methods "DTM-relative=--dtm-relative"`).
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(HERE, 'results', 'results.json')
METHODS = {'supervised': '--threshold none', 'FixMatch': '--threshold fixed', 'DTM': ''}
COLLAPSED = 0.01  # a class predicted for under 1% of the validation faces at the best checkpoint


def method_flags(method):
    name, _, flags = method.partition('=')
    return name, flags if '=' in method else METHODS[name]


def run_one(method, seed, runs, extra, commit):
    name, flags = method_flags(method)
    out = os.path.join(runs, f'{name}_s{seed}')
    command = f'python train.py {flags} --seed {seed} --workers 1 --out {out} {extra}'.split()
    start = time.time()
    result = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    if result.returncode != 0:
        sys.exit(f'{" ".join(command)} failed: {result.stderr.strip().splitlines()[-1:]}')
    with open(os.path.join(ROOT, out, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    best = max((r for r in records if r['event'] == 'eval'), key=lambda r: r['macro_f1'])
    predicted = [sum(column) for column in zip(*best['confusion'])][:len(best['classes'])]
    return dict(method=name, seed=seed, macro_f1=best['macro_f1'], accuracy=best['accuracy'],
                predicted_share=dict(zip(best['classes'], [n / max(sum(predicted), 1) for n in predicted])),
                minutes=(time.time() - start) / 60, commit=commit,
                command='OMP_NUM_THREADS=1 ' + ' '.join(shlex.quote(c) for c in command))


def rows(args):
    commit = subprocess.run(['git', 'describe', '--always', '--dirty', '--exclude', '*'], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or None
    jobs = [(method, seed) for seed in args.seeds for method in args.methods]
    with ThreadPoolExecutor(args.parallel) as pool:
        new = list(pool.map(lambda job: run_one(*job, args.runs, args.extra, commit), jobs))
    results = json.load(open(args.results)) if os.path.exists(args.results) else []
    done = {(r['method'], r['seed']) for r in new}
    results = [r for r in results if (r['method'], r['seed']) not in done] + new
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, 'w') as f:
        json.dump(results, f, indent=1)
    print(table(results))


def table(results):
    """Per method: its seeds, macro F1 per seed, mean ± std, accuracy, the smallest predicted share, runs collapsed,
    minutes per run and the commits the runs were made at."""
    lines = ['| method | seeds | macro F1 per seed | mean ± std | accuracy, mean | smallest predicted share | collapsed | '
             'minutes/run | commit |', '|---|---|---|---|---|---|---|---|---|']
    for method in dict.fromkeys(r['method'] for r in results):
        runs = sorted((r for r in results if r['method'] == method), key=lambda r: r['seed'])
        f1 = [r['macro_f1'] for r in runs]
        std = statistics.stdev(f1) if len(f1) > 1 else 0.0
        smallest = [min(r['predicted_share'].values()) for r in runs]
        seeds = [r['seed'] for r in runs]
        seeds = f'{seeds[0]}–{seeds[-1]}' if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 1 else \
            ', '.join(map(str, seeds))
        commits = ', '.join(dict.fromkeys(str(r['commit']) for r in runs))
        lines.append(f'| {method} | {seeds} | {" / ".join(f"{x:.3f}" for x in f1)} | {statistics.mean(f1):.3f} ± '
                     f'{std:.3f} | {statistics.mean(r["accuracy"] for r in runs):.3f} | {min(smallest):.3f} | '
                     f'{sum(s < COLLAPSED for s in smallest)} of {len(runs)} | '
                     f'{statistics.mean(r["minutes"] for r in runs):.1f} | {commits} |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    r = sub.add_parser('rows', help='run train.py per method and seed, and record each run')
    r.add_argument('--seeds', type=int, nargs='+', default=list(range(6)))
    r.add_argument('--methods', nargs='+', default=list(METHODS), help='supervised, FixMatch, DTM, or NAME=FLAGS')
    r.add_argument('--parallel', type=int, default=2, help='runs at a time, one thread each')
    r.add_argument('--runs', default='runs/builtin')
    r.add_argument('--extra', default='', help='more train.py arguments for every run')
    t = sub.add_parser('table', help="the README's table, from the results file")
    for p in (r, t):
        p.add_argument('--results', default=RESULTS)
    args = parser.parse_args(argv)
    for method in getattr(args, 'methods', []):
        if '=' not in method and method not in METHODS:
            parser.error(f'--methods: {method!r} is none of {", ".join(METHODS)} and not NAME=FLAGS')
    if args.command == 'rows':
        rows(args)
    else:
        if not os.path.exists(args.results):
            sys.exit(f'--results: no {args.results}; run `rows` first')
        print(table(json.load(open(args.results))))


if __name__ == '__main__':
    main()
