"""
How many lines a reader follows for one training step: train.py's step (from the top of the loop to its logging)
and every function of this repository that the step calls, down to torch, as they run in a default CPU step (one
step of `python train.py`, its loader read in this process so that the data code is counted too). Non-blank lines,
docstrings and comments included: a reader reads them.

    python tools/step_lines.py [--data PATH] [--list]
"""
import argparse
import inspect
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, 'train.py')
STEP_START, STEP_END = 'while step < args.steps:', '# logging, evaluation and checkpoints'


def step_range():
    """The first and last line numbers of the step in train.py."""
    with open(TRAIN) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines, 1) if line.startswith(STEP_START))
    end = next(i for i, line in enumerate(lines, 1) if i > start and line.strip().startswith(STEP_END))
    return start, end - 1, lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', help='a labeled set (default: the built-in faces)')
    parser.add_argument('--list', action='store_true', help='list the functions counted')
    args = parser.parse_args()
    start, end, train_lines = step_range()
    called = set()

    def in_step(frame):
        while frame is not None:
            if frame.f_code.co_filename == TRAIN and frame.f_code.co_name == '<module>':
                return start <= frame.f_lineno <= end
            frame = frame.f_back
        return False

    def tracer(frame, event, arg):
        code = frame.f_code
        if (event == 'call' and code.co_filename.startswith(ROOT + os.sep) and 'site-packages' not in code.co_filename
                and code.co_name != '<module>' and in_step(frame.f_back)):
            called.add(code)
        return None
    flags = ['--steps', '1', '--eval-every', '1', '--workers', '0', '--out', os.path.join(ROOT, 'runs', 'step_lines')]
    sys.argv = [TRAIN, *flags, *(['--data', args.data] if args.data else [])]
    sys.path.insert(0, ROOT)
    os.chdir(ROOT)
    sys.setprofile(tracer)
    try:
        runpy.run_path(TRAIN, run_name='__main__')
    finally:
        sys.setprofile(None)
    lines = {(TRAIN, k) for k in range(start, end + 1) if train_lines[k - 1].strip()}  # a line read once counts once
    for code in sorted(called, key=lambda c: (c.co_filename, c.co_firstlineno)):
        source, first = inspect.getsourcelines(code)
        lines |= {(code.co_filename, first + k) for k, line in enumerate(source) if line.strip()}
        if args.list:
            print(f'{os.path.relpath(code.co_filename, ROOT)}:{first} {code.co_qualname}')
    per_file = {}
    for path, _ in lines:
        per_file[os.path.relpath(path, ROOT)] = per_file.get(os.path.relpath(path, ROOT), 0) + 1
    print(f'lines followed for one default CPU step: {len(lines)} ({len(called)} functions; '
          + ', '.join(f'{path} {n}' for path, n in sorted(per_file.items())) + ')')


if __name__ == '__main__':
    main()
