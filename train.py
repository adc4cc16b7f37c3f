"""
Semi-supervised facial expression recognition with the Dynamic Threshold Module (DTM), FixMatch-style.

    python train.py                                        # built-in generated faces, CPU or one GPU
    python train.py --data RAF-DB --unlabeled faces/ --img-size 112 --steps 100000 --batch-size 64 --mu 7
    torchrun --nproc_per_node 4 train.py ...               # DDP; --batch-size is per GPU

One step, for B labeled images x_b with labels y_b and mu*B unlabeled faces u_b:
    q_b           = softmax(f(weak(u_b)))                   no gradient: the weak view only makes targets
    pseudo, mask  = threshold(q_b)                          dtm.py: mask_b = [max q_b >= T(argmax q_b)]
    L_s           = mean_b CE(f(weak(x_b)), y_b)
    L_u           = 1/(mu B) sum_b mask_b * CE(f(strong(u_b)), pseudo_b)
    L             = L_s + lambda_u * L_u
"""
import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext

import PIL
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from baselines.thresholds import FlexMatchThreshold, FreeMatchThreshold, fairness_loss
from dtm import DynamicThreshold, FixedThreshold, unlabeled_loss
from evaluate import evaluate, format_table
from model import ARCHS, build_model, load_file, own_batch_statistics, running_statistics
from sources import faces, formats, pools

# -----------------------------------------------------------------------------
# configuration: argparse, nothing more
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
method = parser.add_argument_group('method')
method.add_argument('--threshold', default='dtm', choices=('dtm', 'fixed', 'flexmatch', 'freematch', 'none'),
                    help='pseudo-label threshold: dtm, fixed (FixMatch), flexmatch, freematch; none = supervised only')
method.add_argument('--tau', type=float, default=0.95, help='T_max of the DTM; the fixed and FlexMatch threshold')
method.add_argument('--dtm-min', type=float, default=0.7, help='T_min: the lowest DTM threshold')
method.add_argument('--dtm-momentum', type=float, default=0.99, help='m: EMA momentum of the DTM')
method.add_argument('--dtm-relative', action='store_true', help='T(c) = T_max kappa(c) / max kappa (dtm.py)')
method.add_argument('--lambda-u', type=float, default=1.0, help='weight of the unlabeled loss')
method.add_argument('--mu', type=int, default=3, help='unlabeled images per labeled image')
run = parser.add_argument_group('run')
run.add_argument('--data', help='labeled set root (default: the built-in faces, generated into data/faces)')
run.add_argument('--format', choices=formats.FORMATS, help='format of --data (default: detected)')
run.add_argument('--unlabeled', nargs='*', help='unlabeled sources: folder trees of images, InsightFace train.rec '
                 '(or its folder), labeled sets (train split, labels unused); default: the built-in pool')
run.add_argument('--reindex', action='store_true', help='rebuild the cached index of the unlabeled folders')
run.add_argument('--arch', default='resnet18', choices=ARCHS)
run.add_argument('--weights', help='local backbone state dict to start from (its fc is replaced)')
run.add_argument('--img-size', type=int, default=48, help='input size in pixels (faces are resized to it)')
run.add_argument('--steps', type=int, default=500)
run.add_argument('--batch-size', type=int, default=16, help='labeled images per step, per GPU')
run.add_argument('--lr', type=float, default=0.03)
run.add_argument('--weight-decay', type=float, default=5e-4)
run.add_argument('--ema', type=float, default=0.999, help='decay of the weight EMA that is evaluated and saved')
run.add_argument('--eval-every', type=int, default=100)
run.add_argument('--save-every', type=int, default=100)
run.add_argument('--log-every', type=int, default=25)
run.add_argument('--workers', type=int, help='processes per loader (default on a GPU: the cores, split between the '
                 'streams by the images each decodes)')
run.add_argument('--in-memory', nargs='?', const='yes', default='auto', choices=('auto', 'yes', 'no'),
                 help='yes: decode the labeled set and the pool once and keep them as tensors (on the GPU when they '
                 'fit); no: stream them through loader workers; auto (default): yes on a GPU for each one that takes '
                 'at most a quarter of its free memory, else no')
run.add_argument('--pool-labels', help='CSV of file name,class for the unlabeled pool: never trained on, only used to '
                 'log how often the pseudo-labels are right (labeled sets given as --unlabeled carry their own)')
run.add_argument('--seed', type=int, default=0)
run.add_argument('--out', default='runs/default')
run.add_argument('--resume', nargs='?', const='last', help='checkpoint to resume (bare flag: OUT/last.pt)')
run.add_argument('--compile', action='store_true', help='torch.compile the model')
variants = parser.add_argument_group('variants')
variants.add_argument('--grey', action='store_true', help='every image grey: a grey labeled set (FER2013) with '
                      'colour unlabeled faces')
variants.add_argument('--own-bn', action='store_true', help='strong views are trained under their own batch '
                      'statistics, the running ones (the teacher, evaluation) are set by labeled images only: for '
                      'unlabeled faces from another domain (face-recognition photos)')
variants.add_argument('--teacher', default='live', choices=('live', 'ema'),
                      help='who makes the pseudo-labels: the live model (FixMatch) or its weight EMA')
variants.add_argument('--balanced', action='store_true', help='class-balanced sampling of the labeled set')
variants.add_argument('--lr-warmup', type=int, default=0, help='steps of linear learning-rate warm-up')
args = parser.parse_args()
# settings a resumed run may change; everything else is restored from the checkpoint
OPERATIONAL = ('resume', 'out', 'steps', 'workers', 'eval_every', 'save_every', 'log_every', 'compile', 'reindex',
               'in_memory')


def fail(message):
    """A mistake of the user's: one line, no traceback."""
    sys.exit(f'train.py: error: {message}')


def report_unreadable_images(kind, error, traceback):
    """An image the run needs that cannot be read, met at any point of the run (in a loader worker too): one line."""
    if issubclass(kind, data.UnreadableImage):
        print(f'train.py: error: {error}', file=sys.stderr)  # the exit status is 1
    else:
        sys.__excepthook__(kind, error, traceback)


sys.excepthook = report_unreadable_images


# -----------------------------------------------------------------------------
# every value is checked here, before any work starts
if args.resume:
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
    # a setting the checkpoint's train.py did not have was off in that run: its default, not this command's
    vars(args).update({k: saved_config.get(k, parser.get_default(k)) for k in vars(args) if k not in OPERATIONAL})
    if checkpoint['step'] >= args.steps:
        fail(f'--steps: {resume_path} is at step {checkpoint["step"]}; pass --steps above it to train on')
for flag, ok, need in [
        ('--steps', args.steps >= 1, 'at least 1'), ('--batch-size', args.batch_size >= 1, 'at least 1'),
        ('--mu', args.mu >= 1, 'at least 1'), ('--img-size', args.img_size >= 16, 'at least 16'),
        ('--lr', args.lr >= 0, 'at least 0'), ('--weight-decay', args.weight_decay >= 0, 'at least 0'),
        ('--lambda-u', args.lambda_u >= 0, 'at least 0'), ('--ema', 0 <= args.ema < 1, 'in [0, 1)'),
        ('--tau', 0 < args.tau <= 1, 'in (0, 1]'), ('--dtm-momentum', 0 <= args.dtm_momentum < 1, 'in [0, 1)'),
        ('--dtm-min', 0 <= args.dtm_min <= (args.tau if args.threshold == 'dtm' else 1), 'in [0, --tau]: T_min <= T_max'),
        ('--lr-warmup', args.lr_warmup >= 0, 'at least 0'), ('--workers', (args.workers or 0) >= 0, 'at least 0'),
        *[(f'--{name}-every', getattr(args, f'{name}_every') >= 1, 'at least 1') for name in ('eval', 'save', 'log')]]:
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
semi = args.threshold != 'none'
if semi and not args.unlabeled and (args.data or args.unlabeled == []):  # only the built-in data has a default
    fail(f'--threshold {args.threshold} needs --unlabeled images (or use --threshold none)')

# -----------------------------------------------------------------------------
# devices, distributed, precision
ddp = 'RANK' in os.environ  # set by torchrun
if ddp:
    dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f'cuda:{os.environ["LOCAL_RANK"]}' if torch.cuda.is_available() else 'cpu'
else:
    rank, world = 0, 1
    device = 'cuda:0' if torch.cuda.is_available() else 'cpu'  # set_device needs an index
master = rank == 0  # only rank 0 prints and writes files
cuda = device.startswith('cuda')
if cuda:
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
# bf16 where the GPU has it, else fp16 with a GradScaler; full precision on the CPU
amp_dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
autocast = torch.autocast('cuda', dtype=amp_dtype) if cuda else nullcontext()
# loader processes: on a GPU the cores are split by what each stream decodes, mu unlabeled images per labeled one
unlabeled_share = args.mu / (1 + args.mu) if semi else 0
labeled_workers = args.workers if args.workers is not None else data.default_workers(cuda, 1 - unlabeled_share)
unlabeled_workers = args.workers if args.workers is not None else data.default_workers(cuda, unlabeled_share)
idle_workers = max(labeled_workers, unlabeled_workers)  # decoding while no step runs: --in-memory, evaluation
if master and idle_workers and data.CORES and len(data.CORES) == 1 < (os.cpu_count() or 1):
    binding = [name for name in ('OMP_PROC_BIND', 'GOMP_CPU_AFFINITY') if name in os.environ]
    print(f'warning: this process may run on 1 of the {os.cpu_count()} cores, and so may its loader workers, all on '
          f'that one: {"unset " + " and ".join(binding) if binding else "give it more cores"}', file=sys.stderr)
torch.manual_seed(args.seed)  # the initial weights; the data streams and views have generators of their own

# -----------------------------------------------------------------------------
# data: a labeled stream, a validation set, an unlabeled stream
if args.data is None:
    if master:
        faces.default_data()  # generated once, by rank 0, while the other ranks wait
    if ddp:
        dist.barrier()
    args.data = faces.default_data()
    if args.unlabeled is None:
        args.unlabeled = [os.path.join(args.data, 'unlabeled')]
step = checkpoint['step'] if args.resume else 0
decode = data.Decode(args.img_size, args.grey)  # workers only decode: the views are made in the step, on the device
try:  # a reader names the file (and line) of what it cannot read
    train_set = data.load_labeled(args.data, 'train', args.format)
    val_set = data.load_labeled(args.data, 'val', args.format)
    sources = [pools.open_pool(p, reindex=args.reindex) for p in args.unlabeled] if semi else []
    # the pool's true labels where known, by class name (-1 elsewhere): logged, never trained on
    truth = pools.true_labels(sources, train_set.classes, args.pool_labels) if semi else None
except (OSError, ValueError) as error:
    fail(error)
try:
    model = build_model(args.arch, len(train_set.classes), None if args.resume else args.weights).to(device)
except ValueError as error:
    fail(f'--weights: {error}')
if val_set.classes != train_set.classes:
    fail(f'--data: validation classes {val_set.classes} differ from training classes {train_set.classes}')
pool = data.UnlabeledPool(sources, decode) if semi else None
if semi and len(pool) == 0:
    fail(f'--unlabeled {" ".join(args.unlabeled)}: no images found')
classes, num_classes = train_set.classes, len(train_set.classes)
train_set.decode = val_set.decode = decode


def keep_in_memory(dataset):  # --in-memory
    if args.in_memory == 'auto':
        return data.worth_keeping(len(dataset), args.img_size, device)
    return args.in_memory == 'yes'


if keep_in_memory(train_set):
    train_set = data.in_memory(train_set, idle_workers, device)
if semi and keep_in_memory(pool):
    pool = data.in_memory(pool, idle_workers, device)
truth = truth.to(device) if truth is not None else None
augment = data.Augment(args.img_size)
weights = data.class_balanced_weights(train_set.labels, num_classes) if args.balanced else None
# the samplers resume from the stream position the last checkpoint had consumed (step * batch per rank)
labeled_batches = data.batches(train_set, args.batch_size, data.InfiniteSampler(
    len(train_set), args.seed, rank, world, step * args.batch_size, weights), labeled_workers, device)
val_loader = data.loader(torch.utils.data.Subset(val_set, range(rank, len(val_set), world)), 4 * args.batch_size,
                         workers=idle_workers)
if semi:
    unlabeled_batches = data.batches(pool, args.mu * args.batch_size, data.InfiniteSampler(
        len(pool), args.seed + 1, rank, world, step * args.mu * args.batch_size), unlabeled_workers, device)

# -----------------------------------------------------------------------------
# model, weight EMA, optimizer, schedule, threshold
# channels_last: faster convolutions on GPUs, and on the CPU too (tools/bench.py: the contiguous step takes 1.24x as
# long at 48 px on 2 cores, results/bench/cpu-2core.json)
memory_format = torch.channels_last
model = model.to(memory_format=memory_format)
ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # eval mode: BN uses its running statistics
decay, no_decay = [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]
optimizer = torch.optim.SGD([dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0)],
                            lr=args.lr, momentum=0.9, nesterov=True)
# FixMatch's cosine decay lr * cos(7 pi k / 16 K), after an optional linear warm-up
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (args.lr_warmup + 1)) *
                                              math.cos(7 * math.pi * k / (16 * args.steps)))
scaler = torch.amp.GradScaler('cuda', enabled=cuda and amp_dtype == torch.float16)  # a no-op unless fp16
threshold = {'dtm': lambda: DynamicThreshold(num_classes, args.dtm_momentum, args.dtm_min, args.tau, args.dtm_relative),
             'fixed': lambda: FixedThreshold(num_classes, args.tau),
             'flexmatch': lambda: FlexMatchThreshold(num_classes, len(pool), args.tau),
             'freematch': lambda: FreeMatchThreshold(num_classes),  # USB's published momentum, 0.999
             'none': lambda: FixedThreshold(num_classes, 1.0)}[args.threshold]().to(device)
best_f1, best_metrics = -1.0, None
if args.resume:
    for name, part in (('model', model), ('ema_model', ema_model), ('optimizer', optimizer),
                       ('scheduler', scheduler), ('threshold', threshold)):
        try:
            part.load_state_dict(checkpoint[name])
        except (RuntimeError, ValueError, KeyError) as error:  # e.g. a per-image state for a pool of another size
            why = ' '.join(str(error).split())[:400]  # torch's message names the tensors and their shapes
            fail(f'--resume: the {name} in {resume_path} does not fit this run: {why}')
    if checkpoint['scaler']:  # empty when saved without fp16 (CPU, bf16)
        scaler.load_state_dict(checkpoint['scaler'])
    best_f1, best_metrics = checkpoint['best_f1'], checkpoint['best_metrics']
raw_model = model
if args.compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[device] if cuda else None)
teacher = model if args.teacher == 'live' else ema_model
ema_params = [t for t in ema_model.state_dict().values() if t.is_floating_point()]
model_params = [t for t in raw_model.state_dict().values() if t.is_floating_point()]
# --own-bn: the model learns from each domain under that domain's own batch statistics, and the teacher reads the
# unlabeled faces through the running statistics, which only labeled images set. Under the unlabeled batch's own
# statistics the teacher would read them through the one path that nothing labeled anchors, the path the
# unlabeled loss trains: self-training then confirms its own errors there (experiments/fer_lfw/README.md).
# Without --own-bn every forward, the teacher's too, normalises its batch by that batch's own statistics, as FixMatch's
# one forward over all the views does: in one domain the weak views' statistics are the labeled images' as well.
unlabeled_statistics = (lambda: own_batch_statistics(raw_model)) if args.own_bn else nullcontext
teacher_statistics = (lambda: running_statistics(raw_model)) if args.own_bn else nullcontext


@torch.no_grad()
def teacher_probabilities(u_weak):
    """q = softmax(f(weak(u))) of the teacher. The weak view only makes targets: no autograd graph. On one GPU this
    forward is replayed as a CUDA graph (data.CudaGraphs): its small kernels would cost more to launch than to run.
    Autocast caches no weight casts here, as a graph's capture requires."""
    with teacher_statistics(), torch.autocast('cuda', amp_dtype, cache_enabled=False) if cuda else nullcontext():
        return teacher(u_weak).float().softmax(dim=1)


if cuda and not ddp and not args.compile:  # DDP and torch.compile replay the forward their own way
    teacher_probabilities = data.CudaGraphs(teacher_probabilities)


def classify(x_weak, u_strong):
    """f(weak(x)) and f(strong(u)) with a graph: one forward of both, or with --own-bn two, so that each domain is
    normalised by its own batch statistics."""
    if not args.own_bn:
        return model(torch.cat([x_weak, u_strong])).split([len(x_weak), len(u_strong)])
    logits_x = model(x_weak)
    with unlabeled_statistics():
        return logits_x, model(u_strong)


@torch.no_grad()
def update_ema(step):
    # the decay warms up as (1 + k) / (10 + k), so a short run's EMA is not dominated by the initial weights
    torch._foreach_lerp_(ema_params, model_params, 1 - min(args.ema, (1 + step) / (10 + step)))
    for ema_t, t in zip(ema_model.buffers(), raw_model.buffers()):
        if not t.is_floating_point():
            ema_t.copy_(t)  # BN's num_batches_tracked


def sync_buffers():
    """DDP broadcasts rank 0's BN statistics at every forward; so does this before evaluating and saving, so that
    every rank holds the same models."""
    if ddp:
        for tensor in [*raw_model.buffers(), *ema_model.buffers()]:
            dist.broadcast(tensor, 0)


# -----------------------------------------------------------------------------
# logging and checkpoints (rank 0 only)
# plain str: torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses to unpickle
versions = dict(python=platform.python_version(), torch=str(torch.__version__), torchvision=torchvision.__version__,
                pillow=PIL.__version__, cuda=torch.version.cuda, device=torch.cuda.get_device_name() if cuda else 'cpu',
                world_size=world)
config = dict(vars(args))
if master:
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, 'log.jsonl')
    if args.resume and os.path.exists(log_path):  # the steps after the checkpoint are trained again: drop them
        with open(log_path) as f:
            kept = [line for line in f if line.endswith('\n') and json.loads(line).get('step', 0) <= step]
        with open(log_path + '.tmp', 'w') as f:
            f.writelines(kept)
        os.replace(log_path + '.tmp', log_path)
    log_file = open(log_path, 'a')


def log(record):
    if master:
        log_file.write(json.dumps(dict(record, time=round(time.time(), 3))) + '\n')
        log_file.flush()


def save(name):
    """Write a temporary file, then rename it: a crash mid-write never destroys the last good checkpoint."""
    if not master:
        return
    path = os.path.join(args.out, name)
    with open(path + '.tmp', 'wb') as f:
        torch.save(dict(model=raw_model.state_dict(), ema_model=ema_model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), threshold=threshold.state_dict(),
                        step=step, best_f1=best_f1, best_metrics=best_metrics, config=config, classes=classes,
                        versions=versions), f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
    os.replace(path + '.tmp', path)


feeds = {name: 'memory' if isinstance(dataset, data.InMemory) else workers  # where each stream's images come from
         for name, dataset, workers in [('labeled', train_set, labeled_workers), ('unlabeled', pool, unlabeled_workers)]
         if dataset is not None}
log(dict(event='start', step=step, config=config, classes=classes, versions=versions,
         labeled=len(train_set), val=len(val_set), unlabeled=len(pool) if semi else 0, fed_from=feeds))
if master:
    print(f'{len(train_set)} labeled, {len(val_set)} val, {len(pool) if semi else 0} unlabeled images; '
          f'{num_classes} classes {classes if num_classes <= 20 else classes[:10] + ["..."]}; '
          f'{args.arch} at {args.img_size}px on {device} x{world}; threshold={args.threshold}')
    print('; '.join(f'{name} images ' + ('decoded once, in memory' if source == 'memory' else
                                         f'streamed by {source} loader workers' if source else 'read in this process')
                    for name, source in feeds.items()))

# -----------------------------------------------------------------------------
# training loop
# running sums kept on the device and read every --log-every steps: no host sync inside the step. Per class:
# pseudo-labels made and accepted; where the pool's true labels are known, made, accepted, accepted and right, right
C = num_classes
stats = torch.zeros(5 + 6 * C, device=device)  # loss_s, loss_u, mask, steps, skipped, then the per-class counts
first_bad_step = torch.tensor(sys.maxsize, device=device)  # the first step whose loss was not finite, on any rank
skipped_total, data_wait, t_log, t_start, start_step = 0, 0.0, time.time(), time.time(), step
while step < args.steps:
    model.train()
    t0 = time.time()
    x, y = next(labeled_batches)  # uint8 images and their labels; u: uint8 faces and their places in the pool
    if semi:
        u, index, skipped = next(unlabeled_batches)
    data_wait += time.time() - t0
    # each step's views are drawn from a generator seeded by the step (and rank): a resumed run makes the same ones
    views = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * world + rank)
    x_weak = augment.labeled_view(x, views).contiguous(memory_format=memory_format)
    if semi:
        u_weak, u_strong = (t.contiguous(memory_format=memory_format) for t in augment.unlabeled_views(u, views))
        pseudo, mask = threshold(teacher_probabilities(u_weak), index)
    with autocast:
        if semi:
            logits_x, logits_u = classify(x_weak, u_strong)
            loss_u = unlabeled_loss(logits_u, pseudo, mask)
        else:
            logits_x, loss_u, mask = model(x_weak), torch.zeros((), device=device), torch.zeros((), device=device)
        loss_s = F.cross_entropy(logits_x.float(), y)
        loss = loss_s + args.lambda_u * loss_u
        if args.threshold == 'freematch':  # the published FreeMatch adds its fairness term (baselines/thresholds.py)
            loss = loss + 0.001 * fairness_loss(logits_u, mask, threshold.p_model, threshold.label_hist)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    step += 1
    update_ema(step)

    with torch.no_grad():
        first_bad_step = torch.where(torch.isfinite(loss), first_bad_step, first_bad_step.clamp(max=step))
        stats[:5] += torch.stack([loss_s.detach(), loss_u.detach(), mask.mean(), torch.ones_like(loss_s),
                                  skipped.sum().float() if semi else torch.zeros_like(loss_s)])
        if semi:
            known = (truth[index] >= 0).float() if truth is not None else torch.zeros_like(mask)
            right = (truth[index] == pseudo).float() if truth is not None else torch.zeros_like(mask)
            for k, weight in enumerate((None, mask, known, mask * known, mask * right, right)):
                stats[5 + k * C:5 + (k + 1) * C] += torch.bincount(pseudo, weights=weight, minlength=C).float()

    last = step == args.steps
    if step % args.log_every == 0 or last or step % args.eval_every == 0 or step % args.save_every == 0:
        if ddp:
            dist.all_reduce(first_bad_step, dist.ReduceOp.MIN)  # one rank's NaN reaches all ranks' weights
        if first_bad_step.item() < sys.maxsize:  # the one host sync, every few steps: never save a broken model
            log(dict(event='stop', step=first_bad_step.item(), reason='non-finite loss'))
            sys.exit(f'non-finite loss at step {first_bad_step.item()}; stopping. The last good checkpoint in '
                     f'{args.out} is kept.' if master else 1)
    if step % args.log_every == 0 or last:
        totals = torch.cat([stats, torch.tensor([data_wait], device=device)])
        if ddp:
            dist.all_reduce(totals)
        totals = totals.tolist()
        n, elapsed, skipped_total = max(totals[3], 1), time.time() - t_log, skipped_total + int(totals[4])
        images_per_s = n * args.batch_size * (1 + 2 * args.mu * semi) / elapsed  # through the network
        eta = (args.steps - step) * (time.time() - t_start) / (step - start_step)
        record = dict(event='train', step=step, loss_s=totals[0] / n, loss_u=totals[1] / n, lr=scheduler.get_last_lr()[0],
                      images_per_s=images_per_s, data_wait=totals[-1] / world / elapsed, skipped=int(totals[4]))
        line = f'step {step}/{args.steps} | loss_s {record["loss_s"]:.3f} '
        if semi:  # the threshold's columns: supervised runs have none
            thresholds, counts = threshold.threshold().tolist(), [totals[5 + k * C:5 + (k + 1) * C] for k in range(6)]
            record.update(mask=totals[2] / n, thresholds=thresholds, predicted=counts[0], accepted=counts[1])
            line += f'loss_u {record["loss_u"]:.3f} | mask {record["mask"]:.2f} | ' \
                    f'T {min(thresholds):.2f}..{max(thresholds):.2f} '
            if truth is not None:  # precision = accepted_correct / accepted_labeled, recall = .. / correct
                record.update(labeled=counts[2], accepted_labeled=counts[3], accepted_correct=counts[4],
                              correct=counts[5])
                line += f'| precision {sum(counts[4]) / max(sum(counts[3]), 1):.2f} '
        log(record)
        if master:
            print(line + f'| {images_per_s:.0f} img/s, data wait {100 * record["data_wait"]:.0f}% | '
                  f'eta {eta / 60:.1f} min' + (f' | {skipped_total} unreadable skipped' if skipped_total else ''))
        stats.zero_()
        data_wait, t_log = 0.0, time.time()
    if step % args.eval_every == 0 or last:
        sync_buffers()
        metrics = evaluate(ema_model, val_loader, device, classes, autocast)
        log(dict(event='eval', step=step, **metrics))
        if master:
            print(f'eval step {step}: macro F1 {metrics["macro_f1"]:.4f} accuracy {metrics["accuracy"]:.4f}')
        if metrics['macro_f1'] > best_f1:
            best_f1, best_metrics = metrics['macro_f1'], metrics
            save('best.pt')
    if step % args.save_every == 0 or last:
        sync_buffers()
        save('last.pt')

# -----------------------------------------------------------------------------
# summary
if master:
    print(f'\nbest validation macro F1 {best_f1:.4f} (EMA model, saved in {args.out}/best.pt)')
    print(format_table(best_metrics))
    end = dict(event='end', step=step, best_macro_f1=best_f1, best=best_metrics, skipped=skipped_total)
    if semi:
        end['thresholds'] = threshold.threshold().tolist()
        print('final per-class thresholds: ' + ', '.join(f'{c} {t:.3f}' for c, t in zip(classes, end['thresholds'])))
    if skipped_total:
        print(f'{skipped_total} unreadable unlabeled images were skipped')
    log(end)
if ddp:
    dist.destroy_process_group()
