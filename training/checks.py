"""
train.py's checks, made before any work starts: each mistake of the user's ends the run with one line that names the
flag (and file) and what to do, never a traceback.
"""
import os
import sys

import data
from model import load_file

# settings a resumed run may change; everything else is restored from the checkpoint
OPERATIONAL = ('resume', 'out', 'steps', 'workers', 'eval_every', 'save_every', 'log_every', 'compile', 'reindex',
               'in_memory', 'decode_on_device')
OFF = {'lr_warmup': 0, 'lambda_u_warmup': 0}  # settings whose default is not off: what a checkpoint without them ran


def fail(message):
    """A mistake of the user's: one line, no traceback."""
    sys.exit(f'train.py: error: {message}')


def report_unreadable_images(kind, error, traceback):
    """An image the run needs that cannot be read, met at any point of the run (in a loader worker too): one line."""
    if issubclass(kind, data.UnreadableImage):
        print(f'train.py: error: {error}', file=sys.stderr)  # the exit status is 1
    else:
        sys.__excepthook__(kind, error, traceback)


def load_resumed(args, parser):
    """--resume: (checkpoint, its path), args restored to the checkpoint's settings but the operational ones."""
    resume_path = os.path.join(args.out, 'last.pt') if args.resume == 'last' else args.resume
    if not os.path.isfile(resume_path):
        fail(f'--resume: no checkpoint {resume_path}')
    try:
        checkpoint = load_file(resume_path)
    except ValueError as error:
        fail(f'--resume: {error}')
    if not isinstance(checkpoint, dict) or not {'config', 'step', 'model'} <= checkpoint.keys():
        fail(f'--resume: {resume_path} is not a train.py checkpoint (no config, step and model in it)')
    saved_config = checkpoint['config']
    # a setting the checkpoint's train.py did not have was off in that run: its off value, else its default
    vars(args).update({k: saved_config.get(k, OFF.get(k, parser.get_default(k))) for k in vars(args)
                       if k not in OPERATIONAL})
    if checkpoint['step'] >= args.steps:
        fail(f'--steps: {resume_path} is at step {checkpoint["step"]}; pass --steps above it to train on')
    return checkpoint, resume_path


def check_args(args):
    for flag, ok, need in [
            ('--steps', args.steps >= 1, 'at least 1'), ('--batch-size', args.batch_size >= 1, 'at least 1'),
            ('--mu', args.mu >= 1, 'at least 1'), ('--img-size', args.img_size >= 16, 'at least 16'),
            ('--lr', args.lr >= 0, 'at least 0'), ('--weight-decay', args.weight_decay >= 0, 'at least 0'),
            ('--lambda-u', args.lambda_u >= 0, 'at least 0'), ('--ema', 0 <= args.ema < 1, 'in [0, 1)'),
            ('--tau', 0 < args.tau <= 1, 'in (0, 1]'), ('--dtm-momentum', 0 <= args.dtm_momentum < 1, 'in [0, 1)'),
            ('--dtm-min', 0 <= args.dtm_min <= (args.tau if args.threshold == 'dtm' else 1),
             'in [0, --tau]: T_min <= T_max'),
            ('--lr-warmup', args.lr_warmup >= 0, 'at least 0'),
            ('--lambda-u-warmup', args.lambda_u_warmup >= 0, 'at least 0'),
            ('--workers', (args.workers or 0) >= 0, 'at least 0'),
            *[(f'--{name}-every', getattr(args, f'{name}_every') >= 1, 'at least 1')
              for name in ('eval', 'save', 'log')]]:
        if not ok:
            fail(f'{flag} must be {need}')
    for flag, paths in [('--data', [args.data] if args.data else []), ('--unlabeled', args.unlabeled or []),
                        ('--pool-labels', [args.pool_labels] if args.pool_labels else []),
                        ('--weights', [args.weights] if args.weights and not args.resume else [])]:
        for path in paths:
            if not os.path.exists(path):
                fail(f'{flag}: no such file or folder {path}')
    if os.path.isfile(args.out):
        fail(f'--out: {args.out} is a file; give a folder for the run')
    if args.threshold != 'none' and not args.unlabeled and (args.data or args.unlabeled == []):  # only the built-in
        fail(f'--threshold {args.threshold} needs --unlabeled images (or use --threshold none)')  # data has a pool


def warn_if_bound_to_one_core(workers):
    """A process bound to one core (by taskset, or by OMP_PROC_BIND or GOMP_CPU_AFFINITY at `import torch`) binds its
    loader workers to that core too."""
    cores = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else None
    if workers and cores and len(cores) == 1 < (os.cpu_count() or 1):
        binding = [name for name in ('OMP_PROC_BIND', 'GOMP_CPU_AFFINITY') if name in os.environ]
        print(f'warning: this process may run on 1 of the {os.cpu_count()} cores, and so may its loader workers, all '
              f'on that one: {"unset " + " and ".join(binding) if binding else "give it more cores"}', file=sys.stderr)
