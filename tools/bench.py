"""
Speed of the training step and of the data pipeline (issue 6): train.py's step (weak view under no_grad, then one
forward+backward on [labeled, strong]) against the common single forward+backward on [labeled, weak, strong]; the
images/s of one loader worker, labeled and unlabeled, with the unlabeled pipeline's cost per stage; train.py's step
fed by data.loader against the same step fed one pre-made batch. Each comparison interleaves its two variants,
repeats them and takes medians, so its ratio holds on a loaded machine; absolute times do not.

    python bench.py                    # B=16, mu=7 at 48 and 112 px; CUDA (bf16, channels_last) when there is one
    python bench.py --batch-size 64 --steps 50 --compile --json
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))  # the project's modules
import data
from sources import faces, formats, pools
from dtm import DynamicThreshold
from model import ARCHS, build_model

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--arch', default='resnet18', choices=ARCHS)
parser.add_argument('--batch-size', type=int, default=16, help='labeled images per step')
parser.add_argument('--mu', type=int, default=7, help='unlabeled images per labeled image')
parser.add_argument('--sizes', type=int, nargs='+', default=[48, 112], help='image sizes; end to end uses the first')
parser.add_argument('--repeats', type=int, default=3, help='interleaved repeats of each comparison')
parser.add_argument('--steps', type=int, help='timed steps per repeat (default 20 on CUDA, 2 on the CPU)')
parser.add_argument('--images', type=int, default=200, help='images drawn per size, for the pipeline')
parser.add_argument('--jpeg', help='a folder of 112 px JPEG faces (e.g. lfw112) to use instead of drawn ones')
parser.add_argument('--workers', type=int, help='processes per loader (default: as train.py, data.default_workers)')
parser.add_argument('--threads', type=int, help="the step's CPU threads (default: torch's, as in train.py)")
parser.add_argument('--compile', action='store_true', help='torch.compile the model')
parser.add_argument('--json', action='store_true')
parser.add_argument('--quick', action='store_true', help='tiny settings, for the smoke test')
args = parser.parse_args()
if args.quick:
    args.batch_size, args.mu, args.sizes, args.repeats, args.steps, args.images = 2, 2, [32], 2, 1, 16
cuda = torch.cuda.is_available()
if args.workers is None:
    args.workers = data.default_workers(cuda)
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


def compare(a, b, n=1):
    """Median seconds per call of a and of b, interleaved --repeats times, and the median of the ratios a/b, each
    from two adjacent runs that shared the machine's load at the time."""
    times = [(timed(a, n), timed(b, n)) for _ in range(args.repeats)]
    return [statistics.median(t) for t in zip(*times)] + [statistics.median(ta / tb for ta, tb in times)]


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
    augment = data.Augment(size)
    labeled = data.LabeledSet(files[size], [i % 8 for i in range(len(files[size]))], list(faces.CLASSES), 'bench')
    labeled.view = augment.weak_view
    return labeled, data.UnlabeledPool([pools.ListPool(files[size])], augment), augment


def loader_batches(size, workers=args.workers):
    """Batches as train.py draws them: data.loader (pinned memory on CUDA), InfiniteSampler, `workers` processes."""
    labeled, pool, _ = datasets(size)
    labeled_iter = iter(data.loader(labeled, B, data.InfiniteSampler(len(labeled), 0), workers, cuda))
    pool_iter = iter(data.loader(pool, U, data.InfiniteSampler(len(pool), 1), workers, cuda))
    while True:
        yield *next(labeled_iter), *next(pool_iter)[:3]


def stages(augment, path):
    """Augment.two_views on one file, its calls in its order, timed one by one: seconds per stage."""
    chain = (formats.open_image, augment.decode, lambda image: (augment.weak(image), augment.weak(image)),
             lambda views: (views[0], pil_to_tensor(augment.randaugment(to_pil_image(views[1])))),
             lambda views: [augment.normalize(view) for view in views], lambda views: augment.cutout(views[1]))
    value, clock = path, [time.perf_counter()]
    for fn in chain:
        value = fn(value)
        clock.append(time.perf_counter())
    return [b - a for a, b in zip(clock, clock[1:])]


# -----------------------------------------------------------------------------
# the two steps, set up as in train.py: channels_last and bf16 autocast on CUDA, non_blocking copies
model = build_model(args.arch, len(faces.CLASSES)).to(device, memory_format=torch.channels_last if cuda else None)
params = [t for t in model.state_dict().values() if t.is_floating_point()]
ema = [t.detach().clone() for t in params]  # the weight EMA, as train.py's update_ema
decay, no_decay = [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]
optimizer = torch.optim.SGD([dict(params=decay, weight_decay=5e-4), dict(params=no_decay, weight_decay=0)],
                            lr=0.03, momentum=0.9, nesterov=True)
scaler = torch.amp.GradScaler('cuda', enabled=cuda and amp_dtype == torch.float16)  # a no-op unless fp16
threshold = DynamicThreshold(len(faces.CLASSES)).to(device)
net = torch.compile(model) if args.compile else model


def step(batch, concatenated=False):
    x, y, weak, strong, index = (t.to(device, non_blocking=True) for t in batch)
    if cuda:
        x, weak, strong = (t.contiguous(memory_format=torch.channels_last) for t in (x, weak, strong))
    with autocast:
        if concatenated:  # the common step: the weak view joins the graph, and the batch norm statistics
            logits_x, logits_w, logits_u = net(torch.cat([x, weak, strong])).split([B, U, U])
            pseudo, mask = threshold(logits_w.detach().float().softmax(dim=1), index)
        else:  # train.py's: the weak view only makes targets, so no graph and no activations kept for it
            with torch.no_grad():
                probs = net(weak).float().softmax(dim=1)
            pseudo, mask = threshold(probs, index)
            logits_x, logits_u = net(torch.cat([x, strong])).split([B, U])
        loss_u = (F.cross_entropy(logits_u.float(), pseudo, reduction='none') * mask).mean()
        loss = F.cross_entropy(logits_x.float(), y) + loss_u
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    torch._foreach_lerp_(ema, params, 0.001)


# -----------------------------------------------------------------------------
# per size: the two steps on a pre-made batch; one worker's pipeline, on one thread as DataLoader's workers run
results = dict(config=dict(device=torch.cuda.get_device_name() if cuda else f'cpu, {os.cpu_count()} cores',
                           threads=torch.get_num_threads(), load=round(os.getloadavg()[0], 1), torch=torch.__version__,
                           arch=args.arch, batch_size=B, mu=args.mu, compile=args.compile), sizes={})
model.train()
for size in args.sizes:
    batch = next(loader_batches(size, 0))
    timed(lambda: (step(batch), step(batch, True)), 2)  # warm-up: allocator, cuDNN autotuning, compilation
    ours, concat, ratio = compare(lambda: step(batch), lambda: step(batch, True), steps)

    threads, n, (labeled, pool, augment) = torch.get_num_threads(), len(files[size]), datasets(size)
    torch.set_num_threads(1)
    labeled_s, unlabeled_s, _ = compare(lambda: [labeled[(i, i)] for i in range(n)],
                                        lambda: [pool[(i, i)] for i in range(n)])
    tensors = [augment.weak(augment.decode(formats.open_image(path))) for path in files[size]]
    _, _, pil_ratio = compare(lambda: [pil_to_tensor(augment.randaugment(to_pil_image(t))) for t in tensors],
                              lambda: [augment.randaugment(t) for t in tensors])  # the two ways two_views could go
    seconds = torch.tensor([stages(augment, path) + [timed(lambda: pool[(i, i)])]
                            for _ in range(args.repeats) for i, path in enumerate(files[size])]).mean(0)
    seconds[-1] -= seconds[:-1].sum()  # the whole sample, timed next to its stages, less them: seeding and glue
    us = dict(zip(('read', 'decode', 'weak x2', 'randaugment', 'normalize x2', 'cutout', 'rest'),
                  (1e6 * seconds).tolist()))
    samples = [pool[(i % n, i)] for i in range(U)]
    us['collate'] = statistics.median(timed(lambda: default_collate(samples)) for _ in range(args.repeats)) * 1e6 / U
    torch.set_num_threads(threads)
    results['sizes'][size] = dict(step_ours_s=ours, step_concatenated_s=concat, step_ratio=ratio,
                                  labeled_img_s=n / labeled_s, unlabeled_img_s=n / unlabeled_s,
                                  randaugment_pil_over_tensor=pil_ratio, us_per_unlabeled=us)

# -----------------------------------------------------------------------------
# end to end; here the loader workers and the step share the CPU cores, on a GPU host only the step's launches do
size, batch, loader_s, premade_s = args.sizes[0], next(loader_batches(args.sizes[0], 0)), [], []
for _ in range(args.repeats):
    batches = loader_batches(size)
    timed(lambda: step(next(batches)), 2)  # the workers start and fill their prefetch queues
    loader_s.append(timed(lambda: step(next(batches)), 3 * steps))
    batches.close()  # the workers exit: they must not take CPU from the pre-made block
    premade_s.append(timed(lambda: step(batch), 3 * steps))
images = B + 2 * U  # through the network per step
results['end_to_end'] = dict(size=size, workers=args.workers, loader_img_s=images / statistics.median(loader_s),
                             premade_img_s=images / statistics.median(premade_s),
                             ratio=statistics.median(p / ls for ls, p in zip(loader_s, premade_s)))
tmp.cleanup()

if args.json:
    print(json.dumps(results, indent=1))
else:
    print(', '.join(f'{k} {v}' for k, v in results['config'].items()))
    print(f'{"":30}' + ''.join(f'{f"{s} px":>9}' for s in args.sizes))
    rows = {k: [r[k] for r in results['sizes'].values()] for k in results['sizes'][size] if k != 'us_per_unlabeled'}
    rows |= {f'  us/image {k}': [r['us_per_unlabeled'][k] for r in results['sizes'].values()] for k in us}
    for name, values in rows.items():
        print(f'{name:30}' + ''.join(f'{v:9.{2 if abs(v) < 10 else 0}f}' for v in values))
    r = results['end_to_end']
    print(f'end to end at {size} px, {args.workers} workers per loader: {r["loader_img_s"]:.0f} img/s through the '
          f'network, {r["premade_img_s"]:.0f} from a pre-made batch: ratio {r["ratio"]:.2f}')
