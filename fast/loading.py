"""
Loading for a GPU, whose step outruns loader workers that decode every image every epoch: a labeled set or pool
decoded once and kept as one tensor (in_memory), the cores split between the streams by the images each decodes
(default_workers), every worker on all of the process's cores (on_cores), and batches pinned and copied
asynchronously (batches). The batches are data.batches' batches: the same items in the same order.
"""
import contextlib
import functools
import itertools
import math
import os
import sys

import torch
from torch.utils.data import Dataset, default_collate

import data
from fast import gpu_decode


# The cores this process may run on, read at import. A loader worker inherits the binding of the thread it is forked
# from: where a runtime binds the training thread, or a forked child, to one core after that, every worker would
# decode on that one core, so each worker takes back these cores (on_cores). A binding made before, by OMP_PROC_BIND,
# GOMP_CPU_AFFINITY (at `import torch`) or taskset, is the user's: warn_if_bound only warns of it.
CORES = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else None


def on_cores(cores, worker_id):
    """A loader worker's first act: run on `cores`, the training process's (CORES there; a worker started by spawn
    imports this module again, under the binding it inherited)."""
    with contextlib.suppress(OSError):  # cores taken away since
        os.sched_setaffinity(0, cores)


def default_workers(cuda, share=1.0):
    """Processes for a loader that decodes `share` of the images of a step, when --workers is not given. On the CPU
    the workers share the cores with the step: 2. On a GPU the cores only feed it, reading and decoding files: that
    share of the cores but one (the training process's), per process under torchrun, and at least 2."""
    if not cuda:
        return 2
    cores = (len(CORES) if CORES else os.cpu_count() or 2) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    return max(2, round((cores - 1) * share))


def loader(dataset, batch_size, sampler=None, workers=2, collate_fn=None):
    """data.loader whose workers first take back the process's cores."""
    return data.loader(dataset, batch_size, sampler, workers, collate_fn,
                       worker_init_fn=functools.partial(on_cores, CORES) if CORES else None)


class InMemory(Dataset):
    """A labeled set or pool decoded once: `columns` are the tensors its source returns, (images, labels) for a
    labeled set, (images, index, skipped) for a pool, `images` one uint8 tensor (N, 3, S, S) on the CPU or the
    training device. Item i is what the source's item i is (a pool's unreadable images, counted in `unreadable`,
    replaced by the next readable ones), so a sampler draws the same batches from either."""

    def __init__(self, columns, unreadable=0, classes=None, name='unlabeled pool'):
        self.columns, self.unreadable, self.classes, self.name = columns, unreadable, classes, name
        self.images = columns[0]
        self.labels = columns[1].tolist() if classes is not None else None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return tuple(column[index] for column in self.columns)


class Readable(Dataset):
    """What in_memory decodes: (image, label) of a labeled set; (image or None,) of a pool, an unreadable image
    not replaced by the next one."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (self.dataset.read(i),) if isinstance(self.dataset, data.UnlabeledPool) else self.dataset[i]


def stack_readable(samples):
    """Collate in the worker: (the readable samples stacked, or None; which samples were readable)."""
    readable = [s for s in samples if s[0] is not None]
    return (default_collate(readable) if readable else None), torch.tensor([s[0] is not None for s in samples])


def in_memory(dataset, workers=2, device='cpu'):
    """Decode every image of a LabeledSet or UnlabeledPool once, through `workers` processes, into one uint8 tensor:
    the images of a run are then decoded once, not once an epoch. A 48 px face takes 7 kB (3 channels, even grey).
    In a pool an unreadable image is replaced by the next readable one, as data.UnlabeledPool does, with its index and
    the count skipped: the same items, so streamed and in-memory runs draw the same batches."""
    pool, images, labels, was_readable, start = isinstance(dataset, data.UnlabeledPool), None, [], [], 0
    for readable, mask in loader(Readable(dataset), 256, workers=workers, collate_fn=stack_readable):
        if readable is not None:
            if images is None:  # one image's size is known now: place the whole tensor
                images = empty_images((len(dataset), *readable[0].shape[1:]), torch.device(device))
            at = start + mask.nonzero().flatten()  # each readable image in its own place
            images.index_copy_(0, at.to(images.device), readable[0].to(images.device))
            labels += readable[1:]
        was_readable.append(mask)
        start += len(mask)
    if images is None:
        raise data.UnreadableImage(f'{dataset.name if not pool else "the unlabeled pool"}: no readable image')
    if not pool:
        return InMemory((images, torch.cat(labels).to(images.device)), 0, dataset.classes, dataset.name)
    readable = torch.cat(was_readable)
    index = next_readable(readable)
    skipped = (index - torch.arange(len(index))) % len(index)
    if skipped.max() >= 100:
        source, j = dataset.locate(int(skipped.argmax()))
        raise data.UnreadableImage(f'100 unreadable images in a row in the unlabeled pool, from {source.name(j)}')
    unreadable = int((~readable).sum())
    if unreadable:
        images[~readable.to(images.device)] = images[index[~readable].to(images.device)]
        print(f'warning: {unreadable} unreadable images in the unlabeled pool, each replaced by the next readable one',
              file=sys.stderr)
    return InMemory((images, index.to(images.device), skipped.to(images.device)), unreadable)


def next_readable(readable):
    """For each position of a pool, the first readable one at or after it, wrapping around past the end: where
    data.UnlabeledPool.__getitem__ finds its image."""
    n = len(readable)
    positions = torch.arange(2 * n)  # the pool twice over, for the wrap
    ahead = torch.where(readable.repeat(2), positions, 2 * n)
    return ahead.flip(0).cummin(0).values.flip(0)[:n] % n  # the least readable position at or after each


def worth_keeping(images, img_size, device):
    """--in-memory auto: keep a set of `images` decoded on a GPU when they take at most a quarter of its free memory.
    There loader workers decoding every epoch cannot keep up with the step (results/bench/README.md); on the CPU they
    can, and streaming saves the memory."""
    device = torch.device(device)
    return device.type == 'cuda' and images * 3 * img_size ** 2 <= torch.cuda.mem_get_info(device)[0] // 4


def empty_images(shape, device):
    """An uninitialised uint8 tensor on `device` when it fits in half its free memory (the other half for the
    model), else in the CPU's, pinned when `device` is a GPU so that batches copy to it asynchronously."""
    if device.type != 'cuda':
        return torch.empty(shape, dtype=torch.uint8)
    if math.prod(shape) < torch.cuda.mem_get_info(device)[0] // 2:
        return torch.empty(shape, dtype=torch.uint8, device=device)
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True)


def batches(dataset, batch_size, sampler, workers=2, device='cpu'):
    """An endless stream of batches, tuples of tensors already on `device`, in the order of `sampler` (an
    InfiniteSampler). An InMemory dataset is indexed directly (on its device, or through pinned memory); any other
    one streams through `workers` loader processes. On CUDA each batch is pinned here, in the training loop's thread,
    and copied asynchronously: not in a pinning thread of the loader's, whose pinning while the loop captures a CUDA
    graph (CudaGraphs) would break the capture."""
    device = torch.device(device)
    cuda = device.type == 'cuda'

    def to_device(batch):  # pinned: a copy from pageable memory would wait for the GPU to finish its queue
        return tuple((t.pin_memory() if cuda else t).to(device, non_blocking=True) for t in batch)
    if isinstance(dataset, gpu_decode.PoolBytes):  # JPEG bytes from the workers, decoded here on the device
        for items in loader(dataset, batch_size, sampler, workers, collate_fn=gpu_decode.as_list):
            yield gpu_decode.decode_batch(items, dataset.pool, device)
    if isinstance(dataset, InMemory):
        indices = iter(sampler)
        while True:
            index = torch.tensor(list(itertools.islice(indices, batch_size)))
            yield dataset[to_device([index])[0]] if dataset.images.is_cuda else to_device(dataset[index])
    for batch in loader(dataset, batch_size, sampler, workers):
        yield to_device(batch)




def streams(streams, workers, keep, img_size, mu, device, device_decode=False):
    """train.py's batch streams on a GPU, or with --in-memory yes: for streams [(name, dataset, batch size, sampler)],
    (their batch streams, where each is fed from: 'memory' or its workers, the workers for evaluation). Without
    --workers a stream has its share of the cores by the images it decodes: 1 labeled to mu unlabeled. device_decode:
    a streamed pool's JPEG files are decoded on the device, the workers only read their bytes (fast/gpu_decode.py)."""
    shares = dict(labeled=1 / (1 + mu), unlabeled=mu / (1 + mu)) if len(streams) > 1 else dict(labeled=1.0)
    cuda = torch.device(device).type == 'cuda'
    counts = {name: workers if workers is not None else default_workers(cuda, shares[name]) for name, *_ in streams}
    idle = max(counts.values())  # decoding while no step runs: in memory, evaluation
    batch_streams, feeds = [], {}
    for name, dataset, batch_size, sampler in streams:
        if worth_keeping(len(dataset), img_size, device) if keep == 'auto' else keep == 'yes':
            dataset = in_memory(dataset, idle, device)
        feeds[name] = 'memory' if isinstance(dataset, InMemory) else counts[name]
        if device_decode and isinstance(dataset, data.UnlabeledPool):
            dataset = gpu_decode.PoolBytes(dataset)
        batch_streams.append(batches(dataset, batch_size, sampler, counts[name], device))
    return batch_streams, feeds, idle
