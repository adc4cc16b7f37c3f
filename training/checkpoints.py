"""
train.py's checkpoints: one dict of every state a run needs to go on bit for bit, written so that a crash mid-write
never destroys the last good one, and read back with one line of error when it does not fit the run.
"""
import json
import os

import torch

from training.checks import fail


def save(path, **state):
    """Write a temporary file, then rename it: a crash mid-write never destroys the last good checkpoint."""
    with open(path + '.tmp', 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
    os.replace(path + '.tmp', path)


def restore(checkpoint, path, **parts):
    """Load each part's state from the checkpoint: one line naming the part and the tensors where it does not fit."""
    for name, part in parts.items():
        try:
            part.load_state_dict(checkpoint[name])
        except (RuntimeError, ValueError, KeyError) as error:  # e.g. a per-image state for a pool of another size
            why = ' '.join(str(error).split())[:400]  # torch's message names the tensors and their shapes
            fail(f'--resume: the {name} in {path} does not fit this run: {why}')


def open_log(out, resumed_step=None):
    """OUT/log.jsonl for appending; resumed, without the records after the checkpoint's step (trained again)."""
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, 'log.jsonl')
    if resumed_step is not None and os.path.exists(log_path):
        with open(log_path) as f:
            kept = [line for line in f if line.endswith('\n') and json.loads(line).get('step', 0) <= resumed_step]
        with open(log_path + '.tmp', 'w') as f:
            f.writelines(kept)
        os.replace(log_path + '.tmp', log_path)
    return open(log_path, 'a')
