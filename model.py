"""
The classifier: a torchvision ResNet with its fc layer sized for the expression classes.

The network is torchvision's, unchanged, so ImageNet or face-recognition backbone weights in torchvision's key
layout load as they are. Small inputs work as they are too: a 48 px face leaves a 2x2 map after layer4, which the
adaptive average pool reduces to one vector; pass --img-size 112 to upsample small faces for more spatial
resolution at ~5x the compute. Grey images are converted to 3 channels by the data loader.
"""
import pickle
import zipfile
from contextlib import contextmanager

import torch
import torchvision

ARCHS = ('resnet18', 'resnet34', 'resnet50')


def build_model(arch, num_classes, weights=None):
    """A torchvision ResNet classifier; `weights` is an optional local state-dict file for the backbone."""
    if arch not in ARCHS:
        raise ValueError(f'unknown --arch {arch!r}; choose one of {", ".join(ARCHS)}')
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    if weights:
        load_backbone(model, weights)
    return model


def load_file(path):
    """torch.load(path, weights_only=True): a weights or checkpoint file is data, never code. Whatever is wrong with
    the file becomes one ValueError that names it."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise ValueError(f'{path}: not a file written by torch.save')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f'{path}: holds objects other than tensors and plain data, which could run code when '
                         'loaded: refused') from None
    except Exception as error:  # a damaged archive
        raise ValueError(f'{path}: torch.load cannot read it ({type(error).__name__}: {error})'.splitlines()[0]) from None


def load_backbone(model, path):
    """Load backbone weights from a local file (a state dict, or a checkpoint holding one under 'model' or
    'state_dict'). weights_only=True: a weights file is data, never code. The fc layer is always replaced."""
    state = load_file(path)
    for key in ('model', 'state_dict'):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f'{path}: not a state dict of tensors')
    state = {k.removeprefix('module.').removeprefix('backbone.'): v for k, v in state.items()}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if not k.startswith('fc.') and k in own and v.shape == own[k].shape}
    if not usable:
        raise ValueError(f'{path}: no tensor matches the {type(model).__name__} layout (keys like {next(iter(own))!r})')
    model.load_state_dict(usable, strict=False)
    missing = [k for k in own if k not in usable and not k.startswith('fc.')]
    if missing:
        print(f'warning: {path} has no usable weights for {len(missing)} backbone tensors, e.g. {missing[:3]}')
    return len(usable)


@contextmanager
def own_batch_statistics(*models):
    """Inside, batch norm normalises each forward by its own batch statistics and leaves the running statistics
    (which evaluation uses) alone: in train mode with track_running_stats off, batch norm uses the batch's
    statistics and neither updates nor counts the running ones. train.py --own-bn passes the unlabeled faces
    through the model this way, so each domain reaches the classifier standardised on its own."""
    batch_norms = [m for model in models for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in batch_norms]
    for m in batch_norms:
        m.train()
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, (training, track) in zip(batch_norms, saved):
            m.train(training)
            m.track_running_stats = track


@contextmanager
def running_statistics(*models):
    """Inside, batch norm normalises by its running statistics, as at evaluation, and updates nothing. train.py
    --own-bn makes its pseudo-labels this way: the teacher reads an unlabeled face as the evaluated model would."""
    batch_norms = [m for model in models for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.training for m in batch_norms]
    for m in batch_norms:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(batch_norms, saved):
            m.train(training)
