"""
Speed of the data pipeline and of the training step, side by side in one run:
  augmentation  the views of a step's batches (weak; strong = weak + RandAugment + Cutout; normalised), made by
                data.Augment on the whole batch on the training device (on a GPU replayed as CUDA graphs, and
                without them), against the per-image path loader workers used to take (RandAugment on PIL images,
                one image at a time; kept below for this comparison only); and against the step itself
  step          the training step as train.py runs it (the teacher's no-grad forward of the weak view, on a GPU
                replayed as a CUDA graph, then one forward+backward on [labeled, strong]), the same with the teacher's
                forward run plainly, and the common single forward+backward on [labeled, weak, strong]
  end to end    per size, images/s of the whole step, augmentation included, fed by loading.batches from image files
                through loader workers (on a GPU also with the training process held to one CPU thread), from the
                decoded set in memory (loading.in_memory), and from pre-made uint8 batches; and the pace of the loader
                workers alone, with no step beside them (loader_alone)
  channels_last the step with the model and its inputs in channels_last memory format against contiguous
Each comparison interleaves its variants, repeats them and takes medians, so its ratios hold on a loaded machine;
absolute times do not.

    python tools/bench.py              # B=16, mu=7 at 48 and 112 px; CUDA (bf16) when there is one
    python tools/bench.py --batch-size 64 --steps 50 --json
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))  # the project's modules
import data
from fast import gpu_decode, loading
from fast.cuda_graphs import CudaGraphs
from fast.views import GpuAugment
from sources import faces, formats, pools
from dtm import DynamicThreshold
from model import ARCHS, build_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--arch', default='resnet18', choices=ARCHS)
parser.add_argument('--batch-size', type=int, default=16, help='labeled images per step')
parser.add_argument('--mu', type=int, default=7, help='unlabeled images per labeled image')
parser.add_argument('--sizes', type=int, nargs='+', default=[48, 112], help='image sizes; channels_last uses the first')
parser.add_argument('--repeats', type=int, default=3, help='interleaved repeats of each comparison')
parser.add_argument('--steps', type=int, help='timed steps per repeat (default 20 on CUDA, 2 on the CPU)')
parser.add_argument('--images', type=int, default=200, help='image files drawn per size')
parser.add_argument('--jpeg', help='a folder of 112 px JPEG faces (e.g. lfw112) to use instead of drawn ones')
parser.add_argument('--workers', type=int, help='processes per loader (default: as train.py, the cores split by '
                    'images)')
parser.add_argument('--threads', type=int, help="the step's CPU threads (default: torch's, as in train.py)")
parser.add_argument('--compile', action='store_true', help='torch.compile the model')
parser.add_argument('--json', action='store_true')
parser.add_argument('--quick', action='store_true', help='tiny settings, for the smoke test')
args = parser.parse_args()
if args.quick:
    args.batch_size, args.mu, args.sizes, args.repeats, args.steps, args.images = 2, 2, [32], 2, 1, 16
cuda = torch.cuda.is_available()
workers = dict(labeled=args.workers, unlabeled=args.workers) if args.workers is not None else dict(  # as train.py
    labeled=loading.default_workers(cuda, 1 / (1 + args.mu)),
    unlabeled=loading.default_workers(cuda, args.mu / (1 + args.mu)))
B, U, device, steps = args.batch_size, args.mu * args.batch_size, 'cuda' if cuda else 'cpu', args.steps or 2 + 18 * cuda
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
autocast = torch.autocast('cuda', dtype=amp_dtype) if cuda else nullcontext()  # as train.py
if args.threads:  # where other jobs share the CPU, one thread can beat two: a parallel region waits for both
    torch.set_num_threads(args.threads)
sync = torch.cuda.synchronize if cuda else lambda: None  # CUDA runs asynchronously: wait before reading the clock
torch.manual_seed(0)


def timed(fn, n=1):
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


def compare(*fns, n=1):
    """Median seconds per call of each fn, interleaved --repeats times, then the median ratio of the first to each
    other, each ratio from adjacent runs that shared the machine's load at the time."""
    times = [[timed(fn, n) for fn in fns] for _ in range(args.repeats)]
    return ([statistics.median(t) for t in zip(*times)] +
            [statistics.median(t[0] / t[k] for t in times) for k in range(1, len(fns))])


def commit():
    """The checkout's commit (with '-dirty' if files changed since), or None outside git."""
    try:
        return subprocess.run(['git', 'describe', '--always', '--dirty', '--exclude', '*'], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:  # no git
        return None


# -----------------------------------------------------------------------------
# data: built-in faces drawn at each size, PNG up to 48 px (the built-in set's format), JPEG above
tmp, rng, files = tempfile.TemporaryDirectory(prefix='bench-'), random.Random(0), {}
for size in args.sizes:
    files[size] = [os.path.join(tmp.name, f'{size}_{i}.{"png" if size <= 48 else "jpg"}') for i in range(args.images)]
    if size == 112 and args.jpeg:
        files[size] = pools.scan_images(args.jpeg)[:args.images]
        continue
    people = [faces.new_identity(rng) for _ in range(20)]
    for i, path in enumerate(files[size]):
        faces.draw_face(rng.choice(people), faces.expression(i % 8, rng), rng, size).save(path, quality=90)


def datasets(size):
    decode = data.Decode(size)
    labeled = data.LabeledSet(files[size], [i % 8 for i in range(len(files[size]))], list(faces.CLASSES), 'bench')
    labeled.decode = decode
    return labeled, data.UnlabeledPool([pools.ListPool(files[size])], decode)


class PerImage:
    """The per-image path, for comparison only: the two views of one uint8 image as loader workers made them,
    RandAugment on a PIL image (faster there than on a small tensor), the rest written out."""

    def __init__(self, size):
        self.size, self.pad = size, size // 8
        self.randaugment = v2.RandAugment(num_ops=2, magnitude=10)
        self.cutout = v2.RandomErasing(p=1.0, scale=(0.02, 0.15), ratio=(0.3, 3.3), value=0)

    def weak(self, image):
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        image = F.pad(image, [self.pad] * 4, mode='reflect')
        top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
        return image[:, top:top + self.size, left:left + self.size]

    def __call__(self, image):
        strong = pil_to_tensor(self.randaugment(to_pil_image(self.weak(image))))
        return data.normalize(self.weak(image)[None])[0], self.cutout(data.normalize(strong[None])[0])


# -----------------------------------------------------------------------------
# the steps, set up as in train.py: channels_last, bf16 autocast on CUDA, non_blocking copies


def make_step(channels_last=True):
    """train.py's step on ready views (x, y, weak, strong, index) for a model of its own in the given memory format;
    form='plain teacher' runs the teacher's forward without a CUDA graph, form='concatenated' is the common step."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(args.arch, len(faces.CLASSES)).to(device, memory_format=memory_format).train()
    params = [t for t in model.state_dict().values() if t.is_floating_point()]
    ema = [t.detach().clone() for t in params]  # the weight EMA, as train.py's update_ema
    decay, no_decay = [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([dict(params=decay, weight_decay=5e-4), dict(params=no_decay, weight_decay=0)],
                                lr=0.03, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler('cuda', enabled=cuda and amp_dtype == torch.float16)  # a no-op unless fp16
    threshold = DynamicThreshold(len(faces.CLASSES)).to(device)
    net = torch.compile(model) if args.compile else model

    @torch.no_grad()
    def teacher_probabilities(weak):  # as train.py's
        with torch.autocast('cuda', amp_dtype, cache_enabled=False) if cuda else nullcontext():
            return net(weak).float().softmax(dim=1)
    graphed_teacher = CudaGraphs(teacher_probabilities) if cuda and not args.compile else teacher_probabilities

    def step(x, y, weak, strong, index, form='ours'):
        x, weak, strong = (t.contiguous(memory_format=memory_format) for t in (x, weak, strong))
        if form == 'concatenated':  # the common step: the weak view joins the graph, and the batch norm statistics
            with autocast:
                logits_x, logits_w, logits_u = net(torch.cat([x, weak, strong])).split([len(x), len(weak), len(weak)])
            pseudo, mask = threshold(logits_w.detach().float().softmax(dim=1), index)
        else:  # train.py's: the weak view only makes targets, so no graph and no activations kept for it
            pseudo, mask = threshold((graphed_teacher if form == 'ours' else teacher_probabilities)(weak), index)
            with autocast:
                logits_x, logits_u = net(torch.cat([x, strong])).split([len(x), len(strong)])
        with autocast:
            loss_u = (F.cross_entropy(logits_u.float(), pseudo, reduction='none') * mask).mean()
            loss = F.cross_entropy(logits_x.float(), y) + loss_u
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        torch._foreach_lerp_(ema, params, 0.001)
    return step


def train_augment(size):
    """The views as train.py makes them: fast/'s on a GPU, data.Augment's on the CPU."""
    return GpuAugment(size) if cuda else data.Augment(size)


def views(augment, generator, labeled, unlabeled):
    """A step's views from uint8 batches on the device: (x, y, weak, strong, index)."""
    (images, labels), (pool_images, index, _) = labeled, unlabeled
    return augment.labeled_view(images, generator), labels, *augment.unlabeled_views(pool_images, generator), index


def augmented_step(step, augment, generator):
    """The whole training step on uint8 batches on the device: the views, then the step."""
    return lambda labeled, unlabeled: step(*views(augment, generator, labeled, unlabeled))


class CoresSeen(torch.utils.data.Dataset):
    """How many cores a loader worker may run on."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def worker_cores():
    return int(next(iter(loading.loader(CoresSeen(), 1, workers=1))))


def first_batches(size):
    """One labeled and one unlabeled uint8 batch on the device, decoded from the files."""
    labeled, pool = datasets(size)
    return (next(loading.batches(labeled, B, data.InfiniteSampler(len(labeled), 0), 0, device)),
            next(loading.batches(pool, U, data.InfiniteSampler(len(pool), 1), 0, device)))


# -----------------------------------------------------------------------------
# per size: the augmentation, batched on the device against per image and against the step; the steps on ready views
results = dict(config=dict(device=torch.cuda.get_device_name() if cuda else f'cpu, {os.cpu_count()} cores',
                           commit=commit(), kernel=platform.release(), threads=torch.get_num_threads(),
                           load=round(os.getloadavg()[0], 1),
                           torch=torch.__version__, arch=args.arch, batch_size=B, mu=args.mu, workers=workers,
                           compile=args.compile),
               sizes={}, end_to_end={})
step = make_step()
for size in args.sizes:
    augment, per_image = train_augment(size), PerImage(size)  # augment: the way train.py makes the views
    ways = dict(every_image=GpuAugment(size),  # on a GPU, replayed as CUDA graphs
                every_image_no_graphs=GpuAugment(size, cuda_graphs=False),
                plain=data.Augment(size))  # each operation on the images that drew it
    generator = torch.Generator().manual_seed(0)
    labeled, unlabeled = first_batches(size)
    on_cpu = unlabeled[0].cpu()
    for way in (augment, *ways.values()):  # on a GPU the first call of a shape warms up, the second captures its graph
        views(way, generator, labeled, unlabeled), views(way, generator, labeled, unlabeled)
    batched_s, *way_s = compare(lambda: augment.unlabeled_views(unlabeled[0], generator),
                                *[lambda w=way: w.unlabeled_views(unlabeled[0], generator) for way in ways.values()],
                                lambda: [per_image(image) for image in on_cpu])[:len(ways) + 2]
    per_image_s = way_s.pop()
    decode = data.Decode(size)
    decode_s = statistics.median(timed(lambda: [decode(formats.open_image(path)) for path in files[size]])
                                 for _ in range(args.repeats)) / len(files[size])

    ready = views(augment, generator, labeled, unlabeled)
    ready = tuple(t.clone() for t in ready)  # the graphs' buffers are overwritten by their next replay
    for form in ('ours', 'ours', 'plain teacher', 'concatenated'):  # warm-up (and the teacher's graph)
        timed(lambda: step(*ready, form=form), 2)
    ours, concat, plain_teacher, aug_s, ratio, _, step_over_aug = compare(
        lambda: step(*ready), lambda: step(*ready, form='concatenated'), lambda: step(*ready, form='plain teacher'),
        lambda: views(augment, generator, labeled, unlabeled), n=steps)
    results['sizes'][size] = dict(
        aug_batched_us=1e6 * batched_s / U, aug_every_image=cuda,
        **{f'aug_{name}_us': 1e6 * s / U for name, s in zip(ways, way_s)},
        aug_per_image_us=1e6 * per_image_s / U, aug_speedup=per_image_s / batched_s, decode_us=1e6 * decode_s,
        aug_of_step_s=aug_s, aug_fraction=1 / step_over_aug,
        step_ours_s=ours, step_plain_teacher_s=plain_teacher, step_concatenated_s=concat, step_ratio=ratio)

# -----------------------------------------------------------------------------
# end to end, per size; on the CPU the loader workers and the step share the cores
threads = torch.get_num_threads()
for size in args.sizes:
    labeled, pool = datasets(size)
    most = max(workers.values())
    labeled_kept, pool_kept = loading.in_memory(labeled, most, device), loading.in_memory(pool, most, device)
    run = augmented_step(step, train_augment(size), torch.Generator().manual_seed(0))
    premade = first_batches(size)

    def streams_of(labeled, pool, labeled_workers=0, pool_workers=0):  # the two streams, as train.py draws them
        return [loading.batches(labeled, B, data.InfiniteSampler(len(labeled), 0), labeled_workers, device),
                loading.batches(pool, U, data.InfiniteSampler(len(pool), 1), pool_workers, device)]
    streams = dict(loader=lambda: streams_of(labeled, pool, *workers.values()),
                   loader_alone=lambda: streams_of(labeled, pool, *workers.values()),  # no step: the workers' pace
                   one_thread=lambda: streams_of(labeled, pool, *workers.values()),
                   memory=lambda: streams_of(labeled_kept, pool_kept))
    if size > 48:  # JPEG files: the pool's bytes decoded together on the training device (fast/gpu_decode.py)
        streams['loader_device_decode'] = lambda: streams_of(labeled, gpu_decode.PoolBytes(pool), *workers.values())
    if not cuda:  # 'one_thread': the training process with one CPU thread, which a step on a GPU is enough for
        del streams['one_thread']
    seconds = {name: [] for name in [*streams, 'premade']}
    for _ in range(args.repeats):
        for name, make in streams.items():
            torch.set_num_threads(1 if name == 'one_thread' else threads)
            batches = make()
            work = (lambda: list(map(next, batches))) if name == 'loader_alone' else lambda: run(*map(next, batches))
            timed(work, 2)  # the workers start and fill their prefetch queues
            seconds[name].append(timed(work, 3 * steps))
            for stream in batches:
                stream.close()  # the workers exit: they must not take CPU from the others
        torch.set_num_threads(threads)
        seconds['premade'].append(timed(lambda: run(*premade), 3 * steps))
    images = B + 2 * U  # through the network per step
    figures = dict(workers=workers, worker_cores=worker_cores())
    for name in streams:
        figures[f'{name}_img_s'] = images / statistics.median(seconds[name])
        figures[f'{name}_ratio'] = statistics.median(p / s for s, p in zip(seconds[name], seconds['premade']))
    figures['premade_img_s'] = images / statistics.median(seconds['premade'])
    figures['end_to_end_ratio'] = figures.pop('loader_ratio')
    results['end_to_end'][size] = figures

# -----------------------------------------------------------------------------
# channels_last against contiguous: the step at the first size, each format with a model of its own
size = args.sizes[0]
contiguous_step, channels_last_step = make_step(channels_last=False), make_step(channels_last=True)
augment, generator = train_augment(size), torch.Generator().manual_seed(0)
ready = tuple(t.clone() for t in views(augment, generator, *first_batches(size)))
timed(lambda: (contiguous_step(*ready), channels_last_step(*ready)), 3)  # warm-up (and the teacher's graphs)
contiguous_s, channels_last_s, cl_ratio = compare(lambda: contiguous_step(*ready), lambda: channels_last_step(*ready),
                                                  n=steps)
results['channels_last'] = dict(size=size, threads=torch.get_num_threads(), contiguous_s=contiguous_s,
                                channels_last_s=channels_last_s, ratio=cl_ratio)
tmp.cleanup()

if args.json:
    print(json.dumps(results, indent=1))
else:
    print(', '.join(f'{k} {v}' for k, v in results['config'].items()))
    print(f'{"":30}' + ''.join(f'{f"{s} px":>10}' for s in args.sizes))
    for key in results['sizes'][size]:
        values = [r[key] for r in results['sizes'].values()]
        print(f'{key:30}' + ''.join(f'{v:10.{2 if abs(v) < 10 else 0}f}' for v in values))
    for size, r in results['end_to_end'].items():
        print(f'end to end at {size} px, images/s through the network: {r["loader_img_s"]:.0f} fed by '
              f'{workers["labeled"]} + {workers["unlabeled"]} workers on {r["worker_cores"]} cores' +
              (f' ({r["one_thread_img_s"]:.0f} with one CPU thread)' if 'one_thread_img_s' in r else '') +
              f', {r["memory_img_s"]:.0f} from memory, {r["premade_img_s"]:.0f} from pre-made batches '
              f'(loader/pre-made {r["end_to_end_ratio"]:.2f}, memory/pre-made {r["memory_ratio"]:.2f}); '
              f'the workers alone could feed {r["loader_alone_img_s"]:.0f}')
    r = results['channels_last']
    print(f'channels_last at {size} px, {r["threads"]} threads: {r["channels_last_s"]:.3f} s/step against '
          f'{r["contiguous_s"]:.3f} contiguous (contiguous/channels_last {r["ratio"]:.2f})')
