"""
Semi-supervised facial expression recognition with the Dynamic Threshold Module (FixMatch-style).

    python train.py                                        # built-in procedural faces, CPU or one GPU
    python train.py --data RAF-DB --unlabeled faces/ --img-size 112 --steps 100000 --batch-size 64 --mu 7
    torchrun --nproc_per_node 4 train.py ...               # DDP; --batch-size is per GPU

Loss (METHOD.md): L = L_s + lambda_u * L_u, with
    L_s = mean_b CE(f(weak(x_b)), y_b)
    L_u = 1/(mu B) sum_b mask_b * CE(f(strong(u_b)), pseudo_b),   pseudo_b, mask_b = threshold(softmax(f(weak(u_b))))
"""
import argparse
import copy
import json
import math
import os
import platform
import random
import sys
import time
from contextlib import contextmanager, nullcontext

import PIL
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from sources import faces, formats, pools
from baselines.thresholds import FlexMatchThreshold, FreeMatchThreshold
from dtm import DynamicThreshold, FixedThreshold
from evaluate import evaluate, format_table
from model import ARCHS, build_model

# -----------------------------------------------------------------------------
# configuration: argparse and a dict, nothing more
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--data', help='labeled set root (default: the built-in faces, generated into data/faces)')
parser.add_argument('--format', choices=formats.FORMATS, help='format of --data (default: detected; see data.py)')
parser.add_argument('--unlabeled', nargs='*', help='unlabeled sources: image folder trees, InsightFace train.rec '
                    '(or its folder), labeled sets (train split, labels ignored); default: the built-in pool')
parser.add_argument('--reindex', action='store_true', help='rebuild the cached index of the unlabeled sources')
parser.add_argument('--arch', default='resnet18', choices=ARCHS)
parser.add_argument('--weights', help='local backbone state dict to start from (fc is replaced)')
parser.add_argument('--img-size', type=int, default=48, help='input size in pixels (faces are resized to it)')
parser.add_argument('--grey', action='store_true', help='turn every image grey: for grey labeled sets (FER2013) '
                    'with colour unlabeled faces (LFW)')
parser.add_argument('--steps', type=int, default=500)
parser.add_argument('--batch-size', type=int, default=16, help='labeled images per step, per GPU')
parser.add_argument('--mu', type=int, default=3, help='unlabeled images per labeled image')
parser.add_argument('--threshold', default='dtm', choices=('dtm', 'fixed', 'flexmatch', 'freematch', 'none'),
                    help='pseudo-label threshold policy; none = supervised only')
parser.add_argument('--tau', type=float, default=0.95, help='fixed threshold (fixed, flexmatch) and DTM T_max')
parser.add_argument('--dtm-momentum', type=float, default=0.99, help='EMA momentum m of the DTM (and FreeMatch)')
parser.add_argument('--dtm-min', type=float, default=0.7, help='T_min: lowest DTM threshold')
parser.add_argument('--dtm-relative', action='store_true', help='DTM thresholds T_max * kappa / max kappa: the class '
                    'the model is surest of gets T_max, the others less in proportion (dtm.py)')
parser.add_argument('--lambda-u', type=float, default=1.0, help='weight of the unlabeled loss')
parser.add_argument('--warmup', type=float, default=0.0,
                    help='ramp lambda_u up linearly over this fraction of the steps (0: from the start)')
parser.add_argument('--balanced', action='store_true', help='class-balanced sampling of the labeled set')
parser.add_argument('--teacher', default='live', choices=('live', 'ema'),
                    help='model that makes pseudo-labels: the live model (FixMatch) or its EMA (mean teacher)')
parser.add_argument('--own-bn', action='store_true', help='unlabeled views pass through batch norm with their own '
                    'batch statistics and leave the running statistics (used at evaluation) to the labeled batches: '
                    'for unlabeled faces from another domain, such as face-recognition photos')
parser.add_argument('--concat-step', action='store_true', help='one forward+backward on [labeled, weak, strong] '
                    '(the common FixMatch step, with --teacher live), to compare with ours')
parser.add_argument('--lr', type=float, default=0.03)
parser.add_argument('--lr-warmup', type=int, default=0, help='steps of linear learning-rate warm-up')
parser.add_argument('--weight-decay', type=float, default=5e-4)
parser.add_argument('--ema', type=float, default=0.999, help='decay of the weight EMA used for evaluation')
parser.add_argument('--eval-every', type=int, default=100)
parser.add_argument('--save-every', type=int, default=100)
parser.add_argument('--log-every', type=int, default=25)
parser.add_argument('--workers', type=int, help='data loader processes per loader (default: 2 on the CPU, half the '
                    'CPU cores on a GPU, per process: data.default_workers)')
parser.add_argument('--seed', type=int, default=0)
parser.add_argument('--out', default='runs/default')
parser.add_argument('--resume', nargs='?', const='last', help='checkpoint to resume (bare flag: OUT/last.pt)')
parser.add_argument('--compile', action='store_true', help='torch.compile the model (CUDA)')
args = parser.parse_args()
# operational settings a resumed run may change; everything else is restored from the checkpoint
OPERATIONAL = ('resume', 'out', 'steps', 'workers', 'eval_every', 'save_every', 'log_every', 'compile', 'reindex')

# -----------------------------------------------------------------------------
# resume, devices, distributed
if args.resume:
    path = os.path.join(args.out, 'last.pt') if args.resume == 'last' else args.resume
    if not os.path.isfile(path):
        sys.exit(f'--resume: no checkpoint {path}')
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)  # a checkpoint is data, never code
    # a setting the checkpoint's train.py did not have yet was off in that run: its default, not this command's
    saved_config = checkpoint['config']
    vars(args).update({k: saved_config.get(k, parser.get_default(k)) for k in vars(args) if k not in OPERATIONAL})
    if checkpoint['step'] >= args.steps:
        sys.exit(f'{path} is at step {checkpoint["step"]}: pass --steps above it to train on')
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
if args.workers is None:
    args.workers = data.default_workers(cuda)
torch.manual_seed(args.seed)
random.seed(args.seed)

# -----------------------------------------------------------------------------
# data
if args.data is None:
    if master:
        faces.default_data()  # generated once, by rank 0, while the other ranks wait
    if ddp:
        dist.barrier()
    args.data = faces.default_data()
    if args.unlabeled is None:
        args.unlabeled = [os.path.join(args.data, 'unlabeled')]
semi = args.threshold != 'none'
if args.concat_step and (args.teacher != 'live' or args.own_bn):
    sys.exit('--concat-step makes the targets in the live model\'s graph and normalises all views together: it needs '
             '--teacher live and no --own-bn')
if semi and not args.unlabeled:
    sys.exit(f'--threshold {args.threshold} needs --unlabeled images (or use --threshold none)')
augment = data.Augment(args.img_size, args.grey)
train_set = data.load_labeled(args.data, 'train', args.format)
val_set = data.load_labeled(args.data, 'val', args.format)
if val_set.classes != train_set.classes:
    sys.exit(f'validation classes {val_set.classes} differ from training classes {train_set.classes}')
classes, num_classes = train_set.classes, len(train_set.classes)
train_set.view, val_set.view = augment.weak_view, augment.eval_view
step = checkpoint['step'] if args.resume else 0
weights = data.class_balanced_weights(train_set.labels, num_classes) if args.balanced else None
# samplers resume from the stream position the last checkpoint had consumed (step * batch per rank)
labeled_loader = data.loader(train_set, args.batch_size, data.InfiniteSampler(
    len(train_set), args.seed, rank, world, step * args.batch_size, weights), args.workers, cuda)
val_loader = data.loader(torch.utils.data.Subset(val_set, range(rank, len(val_set), world)), 4 * args.batch_size,
                         workers=args.workers)
if semi:
    pool = data.UnlabeledPool([pools.open_pool(p, reindex=args.reindex) for p in args.unlabeled], augment)
    unlabeled_loader = data.loader(pool, args.mu * args.batch_size, data.InfiniteSampler(
        len(pool), args.seed + 1, rank, world, step * args.mu * args.batch_size), args.workers, cuda)

# -----------------------------------------------------------------------------
# model, EMA model, optimizer, schedule, threshold policy
model = build_model(args.arch, num_classes, None if args.resume else args.weights).to(device)  # resume: in checkpoint
if cuda:
    model = model.to(memory_format=torch.channels_last)
ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # eval mode: BN uses its running statistics
decay, no_decay = [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]
optimizer = torch.optim.SGD([dict(params=decay, weight_decay=args.weight_decay), dict(params=no_decay, weight_decay=0)],
                            lr=args.lr, momentum=0.9, nesterov=True)
# FixMatch's cosine decay: lr * cos(7 pi k / 16 K), after an optional linear warm-up
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (args.lr_warmup + 1)) *
                                              math.cos(7 * math.pi * k / (16 * args.steps)))
scaler = torch.amp.GradScaler('cuda', enabled=cuda and amp_dtype == torch.float16)  # a no-op unless fp16
threshold = {'dtm': lambda: DynamicThreshold(num_classes, args.dtm_momentum, args.dtm_min, args.tau, args.dtm_relative),
             'fixed': lambda: FixedThreshold(num_classes, args.tau),
             'flexmatch': lambda: FlexMatchThreshold(num_classes, len(pool), args.tau),
             'freematch': lambda: FreeMatchThreshold(num_classes, args.dtm_momentum),
             'none': lambda: FixedThreshold(num_classes, 1.0)}[args.threshold]().to(device)
best_f1, best_metrics = -1.0, None
if args.resume:
    model.load_state_dict(checkpoint['model'])
    ema_model.load_state_dict(checkpoint['ema_model'])
    optimizer.load_state_dict(checkpoint['optimizer'])
    scheduler.load_state_dict(checkpoint['scheduler'])
    if checkpoint['scaler']:  # empty when saved without fp16 (CPU, bf16)
        scaler.load_state_dict(checkpoint['scaler'])
    threshold.load_state_dict(checkpoint['threshold'])
    best_f1, best_metrics = checkpoint['best_f1'], checkpoint['best_metrics']
raw_model = model
if args.compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[device] if cuda else None)
ema_params = [t for t in ema_model.state_dict().values() if t.is_floating_point()]
model_params = [t for t in raw_model.state_dict().values() if t.is_floating_point()]


batch_norms = [m for net in (raw_model, ema_model) for m in net.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@contextmanager
def unlabeled_batch_norm():
    """With --own-bn, a forward of unlabeled faces (in the model or the EMA teacher) normalises them by their own
    batch statistics, so each domain reaches the classifier standardised on its own, and leaves the running
    statistics, which evaluation uses, to the labeled images: in train mode with track_running_stats off, batch norm
    uses the batch's statistics and neither updates nor counts the running ones."""
    if not args.own_bn:
        yield
        return
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


@torch.no_grad()
def update_ema(step):
    # warm-up the decay so a short run's EMA is not dominated by the random initial weights
    torch._foreach_lerp_(ema_params, model_params, 1 - min(args.ema, (1 + step) / (10 + step)))
    for ema_t, t in zip(ema_model.buffers(), raw_model.buffers()):
        if not t.is_floating_point():
            ema_t.copy_(t)  # BN's num_batches_tracked


def sync_buffers():
    """DDP broadcasts rank 0's BN statistics at every forward; do the same before evaluating and saving,
    so every rank holds identical models."""
    if ddp:
        for tensor in [*raw_model.buffers(), *ema_model.buffers()]:
            dist.broadcast(tensor, 0)


# -----------------------------------------------------------------------------
# logging and checkpoints (rank 0 only)
# plain str: torch.__version__ is a TorchVersion object, which torch.load(weights_only=True) refuses to unpickle
versions = dict(python=platform.python_version(), torch=str(torch.__version__), torchvision=torchvision.__version__,
                pillow=PIL.__version__, cuda=torch.version.cuda, device=torch.cuda.get_device_name() if cuda else 'cpu',
                world_size=world)
config = {k: v for k, v in vars(args).items()}
if master:
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, 'log.jsonl')
    if args.resume and os.path.exists(log_path):
        # the steps logged after the checkpoint are trained again: drop their records (and a line cut by a crash),
        # so the log holds each step once, as the resumed run saw it
        def kept(line):
            try:
                return json.loads(line).get('step', 0) <= step
            except json.JSONDecodeError:
                return False
        with open(log_path) as f, open(log_path + '.tmp', 'w') as tmp:
            tmp.writelines(line for line in f if kept(line))
        os.replace(log_path + '.tmp', log_path)
    log_file = open(log_path, 'a')


def log(record):
    if master:
        log_file.write(json.dumps(dict(record, time=round(time.time(), 3))) + '\n')
        log_file.flush()


def save(name):
    """Write to a temporary file, then rename: a crash mid-write never destroys the last good checkpoint."""
    if not master:
        return
    path = os.path.join(args.out, name)
    with open(path + '.tmp', 'wb') as f:
        torch.save(dict(model=raw_model.state_dict(), ema_model=ema_model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), threshold=threshold.state_dict(),
                        step=step, best_f1=best_f1, best_metrics=best_metrics, config=config, classes=classes,
                        versions=versions, rng=dict(torch=torch.get_rng_state(), python=random.getstate())), f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
    os.replace(path + '.tmp', path)


log(dict(event='start', step=step, config=config, classes=classes, versions=versions,
         labeled=len(train_set), val=len(val_set), unlabeled=len(pool) if semi else 0))
if master:
    print(f'{len(train_set)} labeled, {len(val_set)} val, {len(pool) if semi else 0} unlabeled images; '
          f'{num_classes} classes {classes}; {args.arch} at {args.img_size}px on {device} x{world}; '
          f'threshold={args.threshold}')

# -----------------------------------------------------------------------------
# training loop
labeled_iter = iter(labeled_loader)
unlabeled_iter = iter(unlabeled_loader) if semi else None
if args.resume:  # after iter(), which draws the loaders' base seeds: the RNG goes on exactly where it was saved
    torch.set_rng_state(checkpoint['rng']['torch'])
    random.setstate(checkpoint['rng']['python'])
# running sums kept on the device and read only every --log-every steps: no host sync inside the step
stats = torch.zeros(4 + 2 * num_classes, device=device)  # loss_s, loss_u, mask, steps, per-class accepted, predicted
# the first step whose loss was not finite, on any rank (sys.maxsize: none yet)
first_bad_step, one = torch.tensor(sys.maxsize, device=device), torch.ones((), device=device)
skipped, data_wait, t_log, t_start, start_step = 0, 0.0, time.time(), time.time(), step
while step < args.steps:
    model.train()
    t0 = time.time()
    images, labels = next(labeled_iter)
    if semi:
        weak, strong, index, n_skipped = next(unlabeled_iter)
        skipped += int(n_skipped.sum())
    data_wait += time.time() - t0
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast:
        if semi:
            weak, strong = (t.to(device, non_blocking=True) for t in (weak, strong))
            if cuda:
                weak, strong = (t.contiguous(memory_format=torch.channels_last) for t in (weak, strong))
            if args.concat_step:  # the common FixMatch step, for comparison: the weak view joins the graph
                logits_x, logits_w, logits_u = model(torch.cat([images, weak, strong])).split(
                    [len(images), len(weak), len(strong)])
                probs = logits_w.detach().float().softmax(dim=1)
            else:
                with torch.no_grad(), unlabeled_batch_norm():  # the weak view only makes targets: no graph
                    probs = (model if args.teacher == 'live' else ema_model)(weak).float().softmax(dim=1)
                if args.own_bn:
                    logits_x = model(images)
                    with unlabeled_batch_norm():
                        logits_u = model(strong)
                else:
                    logits_x, logits_u = model(torch.cat([images, strong])).split([len(images), len(strong)])
            pseudo, mask = threshold(probs, index.to(device, non_blocking=True))  # a blocking copy would sync
            loss_u = (F.cross_entropy(logits_u.float(), pseudo, reduction='none') * mask).mean()  # / (mu B)
        else:
            logits_x, loss_u = model(images), torch.zeros((), device=device)
        loss_s = F.cross_entropy(logits_x.float(), labels)
        # the ramp lets the labeled loss shape the classifier before its own pseudo-labels pull on it
        loss = loss_s + args.lambda_u * min(1.0, (step + 1) / max(args.warmup * args.steps, 1)) * loss_u
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    step += 1
    update_ema(step)

    with torch.no_grad():
        first_bad_step = torch.where(torch.isfinite(loss), first_bad_step, first_bad_step.clamp(max=step))
        stats[:4] += torch.stack([loss_s.detach(), loss_u.detach(), mask.mean() if semi else loss_u, one])
        if semi:
            stats[4:4 + num_classes] += torch.bincount(pseudo, weights=mask, minlength=num_classes)
            stats[4 + num_classes:] += torch.bincount(pseudo, minlength=num_classes).float()

    last = step == args.steps
    if step % args.log_every == 0 or last or step % args.eval_every == 0 or step % args.save_every == 0:
        if ddp:
            dist.all_reduce(first_bad_step, dist.ReduceOp.MIN)  # one rank's NaN reaches all ranks' weights
        if first_bad_step.item() < sys.maxsize:  # the one host sync, every few steps: never save a broken model
            log(dict(event='stop', step=first_bad_step.item(), reason='non-finite loss'))
            sys.exit(f'non-finite loss at step {first_bad_step.item()}; stopping. The last good checkpoint in '
                     f'{args.out} is kept.' if master else 1)
    if step % args.log_every == 0 or last:
        totals = torch.cat([stats, torch.tensor([skipped, data_wait], device=device)])
        if ddp:
            dist.all_reduce(totals)
        totals = totals.tolist()
        n = max(totals[3], 1)
        accepted, predicted = totals[4:4 + num_classes], totals[4 + num_classes:4 + 2 * num_classes]
        elapsed = time.time() - t_log
        images_per_s = n * args.batch_size * (1 + 2 * args.mu * semi) / elapsed  # through the network
        eta = (args.steps - step) * (time.time() - t_start) / (step - start_step)
        t_value = threshold.threshold().tolist()
        record = dict(event='train', step=step, loss_s=totals[0] / n, loss_u=totals[1] / n, mask=totals[2] / n,
                      lr=scheduler.get_last_lr()[0], thresholds=t_value, accepted=accepted, predicted=predicted,
                      images_per_s=images_per_s, data_wait=totals[-1] / world / elapsed, skipped=int(totals[-2]))
        log(record)
        if master:
            print(f'step {step}/{args.steps} | loss_s {record["loss_s"]:.3f} loss_u {record["loss_u"]:.3f} | '
                  f'mask {record["mask"]:.2f} | T {min(t_value):.2f}..{max(t_value):.2f} | '
                  f'{images_per_s:.0f} img/s, data wait {100 * record["data_wait"]:.0f}% | '
                  f'eta {eta / 60:.1f} min' + (f' | {int(totals[-2])} unreadable skipped' if totals[-2] else ''))
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
    if semi:  # supervised runs have no thresholds to show
        thresholds = threshold.threshold().tolist()
        print('final per-class thresholds: ' + ', '.join(f'{c} {t:.3f}' for c, t in zip(classes, thresholds)))
    if skipped:
        print(f'{skipped} unreadable unlabeled images were skipped')
    log(dict(event='end', step=step, best_macro_f1=best_f1, best=best_metrics, skipped=skipped,
             thresholds=threshold.threshold().tolist()))
if ddp:
    dist.destroy_process_group()
