"""
The losses of a few short train.py runs, step by step, as exact floats: two commits whose traces are equal train
the same way to the last bit. Used to check that moving code changes nothing it computes.

    python tools/loss_trace.py --data data/faces --out trace.json          # run every configuration
    python tools/loss_trace.py --compare before.json after.json             # equal to the bit, or which differ
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

CONFIGS = {  # name -> train.py flags beyond the common ones
    'default': [],
    'own_bn': ['--own-bn'],
    'fixed': ['--threshold', 'fixed'],
    'flexmatch': ['--threshold', 'flexmatch'],
    'freematch': ['--threshold', 'freematch'],
    'none': ['--threshold', 'none'],
    'ema_teacher_balanced': ['--teacher', 'ema', '--balanced'],
}


def trace(data, flags, steps, workdir):
    """[[step, loss_s, loss_u], ...] of one run, every step logged, in one thread (summation order fixed)."""
    out = os.path.join(workdir, 'run')
    command = [sys.executable, 'train.py', '--data', data, '--unlabeled', os.path.join(data, 'unlabeled'),
               '--steps', str(steps), '--log-every', '1', '--eval-every', str(steps), '--save-every', str(steps),
               '--workers', '0', '--out', out, *flags]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS='1'))
    with open(os.path.join(out, 'log.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return [[r['step'], r['loss_s'], r['loss_u']] for r in records if r['event'] == 'train']


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', help='a labeled set with an unlabeled/ folder (the built-in faces)')
    parser.add_argument('--out', help='JSON file to write')
    parser.add_argument('--steps', type=int, default=12)
    parser.add_argument('--configs', nargs='*', default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument('--compare', nargs=2, metavar=('A', 'B'), help='two traces: exit 1 unless equal')
    args = parser.parse_args()
    if args.compare:
        a, b = (json.load(open(path)) for path in args.compare)
        differ = [name for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]
        print('equal to the bit' if not differ else f'differ: {", ".join(differ)}')
        sys.exit(bool(differ))
    if not args.data or not args.out:
        parser.error('--data and --out are needed to run the configurations')
    traces = {}
    for name in args.configs:
        with tempfile.TemporaryDirectory() as workdir:
            traces[name] = trace(args.data, CONFIGS[name], args.steps, workdir)
        print(name, traces[name][-1])
    with open(args.out, 'w') as f:
        json.dump(traces, f, indent=1)


if __name__ == '__main__':
    main()
