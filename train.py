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
    L             = L_s + lambda_u(k) * L_u                lambda_u(k) ramps up linearly over the first steps
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
from baselines.thresholds import FlexMatchThreshold, FreeMatchThreshold
from dtm import DynamicThreshold, FixedThreshold, unlabeled_loss
from evaluate import evaluate, format_table
from model import build_model, own_batch_statistics, running_statistics
from sources import faces, pools
from training import checkpoints, checks, options
from training.meter import Meter

# -----------------------------------------------------------------------------
# configuration: the flags are in training/options.py (python train.py --help)
parser = options.parser(__doc__)
args = parser.parse_args()
sys.excepthook = checks.report_unreadable_images  # an unreadable labeled image: one line, from any loader worker
checkpoint, resume_path = checks.load_resumed(args, parser) if args.resume else (None, None)
checks.check_args(args)
semi = args.threshold != 'none'

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
        args.pool_labels = args.pool_labels or faces.pool_labels(args.data)  # the pool's true classes, only logged
step = checkpoint['step'] if args.resume else 0
decode = data.Decode(args.img_size, args.grey)  # workers only decode: the views are made in the step
try:  # a reader names the file (and line) of what it cannot read
    train_set = data.load_labeled(args.data, 'train', args.format)
    val_set = data.load_labeled(args.data, 'val', args.format)
    sources = [pools.open_pool(p, reindex=args.reindex) for p in args.unlabeled] if semi else []
    # the pool's true labels where known, by class name (-1 elsewhere): logged, never trained on
    truth = pools.true_labels(sources, train_set.classes, args.pool_labels) if semi else None
except (OSError, ValueError) as error:
    checks.fail(error)
try:
    model = build_model(args.arch, len(train_set.classes), None if args.resume else args.weights).to(device)
except ValueError as error:
    checks.fail(f'--weights: {error}')
if val_set.classes != train_set.classes:
    checks.fail(f'--data: validation classes {val_set.classes} differ from training classes {train_set.classes}')
pool = data.UnlabeledPool(sources, decode) if semi else None
if semi and len(pool) == 0:
    checks.fail(f'--unlabeled {" ".join(args.unlabeled)}: no images found')
classes, num_classes = train_set.classes, len(train_set.classes)
train_set.decode = val_set.decode = decode
truth = truth.to(device) if truth is not None else None
weights = data.class_balanced_weights(train_set.labels, num_classes) if args.balanced else None
B, U = args.batch_size, args.mu * args.batch_size


def sampler(dataset, seed, batch_size, weights=None):  # resumed: from the stream position the checkpoint had reached
    return data.InfiniteSampler(len(dataset), seed, rank, world, step * batch_size, weights)


streams = [('labeled', train_set, B, sampler(train_set, args.seed, B, weights))]
if semi:
    streams.append(('unlabeled', pool, U, sampler(pool, args.seed + 1, U)))
if cuda or args.in_memory == 'yes' or args.decode_on_device:  # fast/: sets kept decoded, the cores split
    from fast import loading
    batch_streams, feeds, workers = loading.streams(streams, args.workers, args.in_memory, args.img_size, args.mu,
                                                    device, args.decode_on_device)
else:  # each stream read and decoded by its own loader workers
    workers = 2 if args.workers is None else args.workers
    batch_streams = [data.batches(dataset, size, order, workers) for _, dataset, size, order in streams]
    feeds = {name: workers for name, *_ in streams}  # where each stream's images come from
labeled_batches, unlabeled_batches = batch_streams if semi else (batch_streams[0], None)
val_loader = data.loader(torch.utils.data.Subset(val_set, range(rank, len(val_set), world)), 4 * B, workers=workers)
if master:
    checks.warn_if_bound_to_one_core(workers)
augment = data.Augment(args.img_size)
if cuda:  # the same views, every image through every operation, replayed as CUDA graphs
    from fast.views import GpuAugment
    augment = GpuAugment(args.img_size)

# -----------------------------------------------------------------------------
# model, weight EMA, optimizer, schedule, threshold
memory_format = torch.channels_last  # faster convolutions, on GPUs and CPUs alike (results/bench/README.md)
model = model.to(memory_format=memory_format)
ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # eval mode: BN uses its running statistics
decay, no_decay = [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]
optimizer = torch.optim.SGD([dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0)],
                            lr=args.lr, momentum=0.9, nesterov=True)
# FixMatch's cosine decay lr * cos(7 pi k / 16 K), after a linear warm-up: at the full rate from the first step, a
# network trained from scratch overshoots and becomes confidently wrong, and a threshold accepts such guesses
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
    checkpoints.restore(checkpoint, resume_path, model=model, ema_model=ema_model, optimizer=optimizer,
                        scheduler=scheduler, threshold=threshold)
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
# unlabeled faces through the running statistics, which only labeled images set: under the unlabeled batch's own
# statistics it would read them through the one path nothing labeled anchors, the path the unlabeled loss trains, and
# self-training would confirm its own errors there. Without --own-bn every forward normalises its batch by its own
# statistics, as FixMatch's one forward over all the views does.
unlabeled_statistics = (lambda: own_batch_statistics(raw_model)) if args.own_bn else nullcontext
teacher_statistics = (lambda: running_statistics(raw_model)) if args.own_bn else nullcontext


@torch.no_grad()
def teacher_probabilities(u_weak):
    """q = softmax(f(weak(u))) of the teacher. The weak view only makes targets: no autograd graph. Autocast caches no
    weight casts here, as a CUDA graph's capture requires."""
    with teacher_statistics(), torch.autocast('cuda', amp_dtype, cache_enabled=False) if cuda else nullcontext():
        return teacher(u_weak).float().softmax(dim=1)


if cuda and not ddp and not args.compile:  # on one GPU the forward's small kernels are replayed as one CUDA graph
    from fast.cuda_graphs import CudaGraphs
    teacher_probabilities = CudaGraphs(teacher_probabilities)


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


# -----------------------------------------------------------------------------
# logging and checkpoints (rank 0 only)
# plain str: torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses to unpickle
versions = dict(python=platform.python_version(), torch=str(torch.__version__), torchvision=torchvision.__version__,
                pillow=PIL.__version__, cuda=torch.version.cuda, device=torch.cuda.get_device_name() if cuda else 'cpu',
                world_size=world)
config = dict(vars(args))
log_file = checkpoints.open_log(args.out, step if args.resume else None) if master else None


def log(record):
    if master:
        log_file.write(json.dumps(dict(record, time=round(time.time(), 3))) + '\n')
        log_file.flush()


def save(name):
    if master:
        checkpoints.save(os.path.join(args.out, name), model=raw_model.state_dict(), ema_model=ema_model.state_dict(),
                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict(), threshold=threshold.state_dict(), step=step, best_f1=best_f1,
                         best_metrics=best_metrics, config=config, classes=classes, versions=versions)


def sync_buffers():
    """DDP broadcasts rank 0's BN statistics at every forward; so does this before evaluating and saving, so that
    every rank holds the same models."""
    if ddp:
        for tensor in [*raw_model.buffers(), *ema_model.buffers()]:
            dist.broadcast(tensor, 0)


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
meter = Meter(num_classes, device, step, truth, ddp)
while step < args.steps:
    model.train()
    t0 = time.time()
    x, y = next(labeled_batches)  # uint8 images and their labels; u: uint8 faces and their places in the pool
    if semi:
        u, index, skipped = next(unlabeled_batches)
    meter.data_wait += time.time() - t0
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
        # lambda_u(k) ramps up over --lambda-u-warmup steps: the young model's confident guesses on the pool are
        # mostly wrong, often all one class, and at full weight training on them would confirm them
        lambda_u = args.lambda_u * min(1.0, (step + 1) / (args.lambda_u_warmup + 1))
        loss = loss_s + lambda_u * loss_u
        if semi:  # FreeMatch's fairness term; nothing for FixMatch and the DTM
            loss = loss + threshold.extra_loss(logits_u, mask)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    step += 1
    update_ema(step)
    meter.add(step, loss, loss_s, loss_u, mask, *((pseudo, index, skipped) if semi else ()))

    # logging, evaluation and checkpoints, every few steps
    last = step == args.steps
    if step % args.log_every == 0 or last or step % args.eval_every == 0 or step % args.save_every == 0:
        bad_step = meter.first_bad_step()
        if bad_step is not None:  # never save a broken model
            log(dict(event='stop', step=bad_step, reason='non-finite loss'))
            sys.exit(f'non-finite loss at step {bad_step}; stopping. The last good checkpoint in {args.out} is '
                     'kept.' if master else 1)
    if step % args.log_every == 0 or last:
        record, line = meter.report(step, args.steps, B + 2 * U * semi, scheduler.get_last_lr()[0],
                                    threshold if semi else None, world)
        log(record)
        if master:
            print(line)
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
    end = dict(event='end', step=step, best_macro_f1=best_f1, best=best_metrics, skipped=meter.skipped_total)
    if semi:
        end['thresholds'] = threshold.threshold().tolist()
        print('final per-class thresholds: ' + ', '.join(f'{c} {t:.3f}' for c, t in zip(classes, end['thresholds'])))
        if truth is not None:
            print(meter.pseudo_label_quality(classes))
    if meter.skipped_total:
        print(f'{meter.skipped_total} unreadable unlabeled images were skipped')
    log(end)
if ddp:
    dist.destroy_process_group()
