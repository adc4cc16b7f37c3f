"""
The real-faces experiment: FER2013 with 10% of its training labels, LFW faces as unlabeled data
(experiments/fer_lfw/README.md has the protocol, the data and the results).

    python experiments/fer_lfw/run.py prepare --fer2013 PATH --lfw PATH > runs.sh   extract or link the data, build
                                                                 the split, print one train.py command per row and seed
    python experiments/fer_lfw/run.py table [--runs runs/fer_lfw]            mean and spread over seeds, from the logs
    prepare --percent 2 ... / table --percent 2                              the same protocol with 2% of the labels
    python experiments/fer_lfw/run.py probe runs/fer_lfw/sup10_s0/best.pt    what a model makes of the LFW faces

--fer2013 is a tar (gzip allowed) or a folder holding train/<class>/ and val/<class>/ (val: the PublicTest images),
at its top or in its one top folder; --lfw is a tar or a folder of <Person_Name>/ folders of face photos, likewise.
A tar is extracted once into WORK, a folder is linked from WORK; WORK keeps them, so another data set needs another
--work. Run it from the repository root: the printed commands are `python train.py ...` with paths under WORK.

Protocol. Labeled: a class-stratified 10% of fer2013/train, fixed by --seed (per class: file names sorted, a
torch.randperm from one torch.Generator seeded once, classes in sorted order, the first round(10% of n) taken,
halves rounded up); the list is written to WORK/labeled10/split.txt, never to git. Validation: fer2013/val.
--percent P takes P% instead (WORK/labeledP, WORK/restR and WORK/ferR with R = 100 - P; rows supP, dtm_ferR, ...),
beside the other splits in the same WORK.
Unlabeled: the 13,233 LFW faces (lfw112), or LFW plus the other 90% of fer2013/train with its labels dropped.
Methods: supervised only, FixMatch, FlexMatch, FreeMatch, DTM; reference: supervised on 100% of the labels.
In-domain rows (fixmatch_fer90, dtm_fer90): the other 90% of fer2013/train as the only pool. With --lfw-labels CSV
(lines `file name,class`), every LFW row passes it as --pool-labels: the log then holds the precision of the
pseudo-labels, never used for training.
Every run the same: ResNet-18 at 48 px, every image grey (--grey), B=16, mu=3, 1,500 steps, lr 0.01 after 100
warm-up steps (chosen on supervised-only validation runs), --own-bn (the LFW faces trained under their own batch
statistics, the running ones kept for FER2013 and read by the teacher); only --threshold and the data differ.
Everything else in WORK is symlinks into those two, nothing is copied:
    WORK/fer2013/, WORK/lfw112/                 the two data sets, extracted (a tar) or linked (a folder)
    WORK/labeled10/train/<class>/  val -> ../fer2013/val      ImageFolder: the 10%
    WORK/full/train -> ../fer2013/train, val                 ImageFolder: 100% of the labels
    WORK/rest90/<class>/                        the other 90%, a folder pool for --unlabeled (labels unused)
    WORK/fer90/train -> ../rest90               the same 90% as a labeled set's train split: the in-domain pool,
                                                its labels read only to measure pseudo-label precision
    WORK/lfw_ids/{train,val}/<person>/          ImageFolder: LFW identities with 4+ photos, each one's last to val
With --pretrain, prepare first prints a face-recognition pretraining run (ResNet-18 classifying the 610 LFW
identities of lfw_ids, the FER protocol's input size and grey images) and every row starts from its weights
(--weights): FER models usually start from face-recognition weights (MS-Celeb-1M), and a from-scratch ResNet
learns slowly at this budget.
"""
import argparse
import csv
import glob
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import tarfile
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))  # the project's modules
from sources import formats
from sources.formats import IMAGE_EXTENSIONS
from tools.plot_log import last_per_step, read_log

PERCENT = 10  # labeled share of each class, unless --percent says otherwise
IDENTITY_MIN = 4  # photos a person needs in LFW to be an identity of the pretraining set (one of them held out)
# face-recognition pretraining on lfw_ids: 64 faces a step, 1,500 steps (~16 epochs of its 6,123 images)
PRETRAIN = '--threshold none --batch-size 64 --lr 0.05 --lr-warmup 100 --steps 1500 --eval-every 500 --save-every 500'
SEMI = [('fixmatch', 'FixMatch', 'fixed'), ('flexmatch', 'FlexMatch', 'flexmatch'),  # run name, table name, --threshold
        ('freematch', 'FreeMatch', 'freematch'), ('dtm', 'DTM', 'dtm')]


def split_names(percent):
    """The folders in WORK of a P% split: labeledP (an ImageFolder of the P%), restR (the other R = 100 - P%, a
    folder pool) and ferR (the same R% as a labeled set's train split)."""
    return f'labeled{percent}', f'rest{100 - percent}', f'fer{100 - percent}'


def protocol_rows(percent=PERCENT):
    """The table's rows in order: run name prefix (the folder is PREFIX_s<seed>) -> (method, --threshold, labeled
    set, unlabeled pools), all in WORK."""
    labeled, rest, in_domain = split_names(percent)
    return {f'sup{percent}': ('supervised', 'none', labeled, ()),
            **{f'{key}_lfw': (name, t, labeled, ('lfw112',)) for key, name, t in SEMI},
            **{f'{key}_lfw_{in_domain}': (name, t, labeled, ('lfw112', rest)) for key, name, t in SEMI},
            # in-domain: the pool is the rest of fer2013/train, read as a labeled set so that train.py knows how
            # often its pseudo-labels are right (its labels are never trained on)
            f'fixmatch_{in_domain}': ('FixMatch', 'fixed', labeled, (in_domain,)),
            f'dtm_{in_domain}': ('DTM', 'dtm', labeled, (in_domain,)),
            'sup100': ('supervised, 100% labels', 'none', 'full', ())}

# -----------------------------------------------------------------------------
# prepare


def is_fer2013_root(folder):
    return all(os.path.isdir(os.path.join(folder, split)) for split in ('train', 'val'))


def is_lfw_root(folder):
    """A folder of people: some subfolder holds photos directly."""
    return any(os.path.isdir(os.path.join(folder, p)) and any(f.lower().endswith(IMAGE_EXTENSIONS)
               for f in os.listdir(os.path.join(folder, p))) for p in os.listdir(folder))


# name in WORK -> (prepare's flag, how to recognise the data set's root folder, its layout in words)
DATASETS = {'fer2013': ('--fer2013', is_fer2013_root, 'train/<class>/ and val/<class>/'),
            'lfw112': ('--lfw', is_lfw_root, '<Person_Name>/ folders of face photos')}


def dataset_root(folder, name):
    """The folder that holds `name`'s data set: `folder` itself or its one top folder (the usual way a tar is
    packed); None if neither."""
    is_root = DATASETS[name][1]
    if is_root(folder):
        return folder
    subfolders = [os.path.join(folder, f) for f in os.listdir(folder) if os.path.isdir(os.path.join(folder, f))]
    return subfolders[0] if len(subfolders) == 1 and is_root(subfolders[0]) else None


def layout_error(flag, path, layout):
    return (f'{flag} {path}: found no {layout} at its top or in its one top folder '
            f'(experiments/fer_lfw/README.md describes the layout)')


def check_prepare(args):
    """Every mistake in prepare's arguments, before anything is written (a tar's layout is known once it is
    extracted: install checks it)."""
    if not 0 < args.percent < 100:
        sys.exit(f'--percent {args.percent}: the labeled share of each class, in %, from 1 to 99')
    if args.lfw_labels is not None and not os.path.isfile(args.lfw_labels):
        sys.exit(f'--lfw-labels {args.lfw_labels}: no such file (a CSV of `file name,class` lines for the LFW faces)')
    for name, (flag, _, layout) in DATASETS.items():
        path = getattr(args, flag[2:])
        if path is None:
            sys.exit(f'prepare needs {flag} PATH: a tar or a folder holding {layout} '
                     f'(experiments/fer_lfw/README.md says where to get it)')
        if os.path.isdir(path):
            if dataset_root(path, name) is None:
                sys.exit(layout_error(flag, path, layout))
        elif not os.path.isfile(path):
            sys.exit(f'{flag} {path}: no such file or folder')
        elif not tarfile.is_tarfile(path):
            sys.exit(f'{flag} {path}: neither a folder nor a tar')
        built = os.path.join(args.work, name)
        if os.path.lexists(built):  # made by an earlier prepare: from this data set?
            if os.path.isdir(path):
                same = os.path.realpath(built) == os.path.realpath(dataset_root(path, name))
            else:  # a tar: which one is not recorded, but it was extracted, not linked
                same = not os.path.islink(built)
            if not same:
                sys.exit(f'{flag} {path}: {built} was made from another {flag} by an earlier prepare; '
                         f'pass another --work')


def install(path, work, name):
    """work/name: the data set at path, a folder (linked) or a tar (extracted once: into a temporary folder, then
    one rename, so an interrupted extraction is never mistaken for a finished one)."""
    built = os.path.join(work, name)
    if os.path.lexists(built):
        return
    if os.path.isdir(path):
        os.symlink(os.path.abspath(dataset_root(path, name)), built)
        return
    tmp = os.path.join(work, f'.{name}.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    print(f'# extracting {path} into {work}', file=sys.stderr)
    with tarfile.open(path) as f:
        f.extractall(tmp, filter='data')  # 'data': no absolute paths, no links out of tmp
    root = dataset_root(tmp, name)
    if root is None:
        shutil.rmtree(tmp)
        flag, _, layout = DATASETS[name]
        sys.exit(layout_error(flag, path, layout))
    os.rename(root, built)
    shutil.rmtree(tmp)


def class_files(folder):
    """{class: sorted image file names} of an ImageFolder split."""
    return {c: sorted(f for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
            for c in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, c))}


def choose(files, percent, seed):
    """The labeled subset: per class, round(percent% of n) (halves up, in integers: no float ties) files drawn by a
    random permutation of the sorted names; one generator, seeded once, walks the classes in sorted order."""
    generator = torch.Generator().manual_seed(seed)
    chosen = {}
    for c, names in files.items():
        k = (len(names) * percent * 2 + 100) // 200
        chosen[c] = sorted(names[i] for i in torch.randperm(len(names), generator=generator)[:k].tolist())
    return chosen


def link_tree(target_root, tree, dest):
    """dest/<class>/<file> -> target_root/<class>/<file> as relative symlinks, built in dest.tmp and renamed."""
    tmp = dest + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)  # links only: rmtree never follows them
    for c, names in tree.items():
        os.makedirs(os.path.join(tmp, c))
        target = os.path.relpath(os.path.join(target_root, c), os.path.join(dest, c))
        for name in names:
            os.symlink(os.path.join(target, name), os.path.join(tmp, c, name))
    os.rename(tmp, dest)


def image_files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))


def link(target, path):
    if not os.path.lexists(path):
        os.symlink(os.path.relpath(target, os.path.dirname(path)), path)


def prepare(args):
    check_prepare(args)
    work = args.work
    os.makedirs(work, exist_ok=True)
    install(args.fer2013, work, 'fer2013')
    install(args.lfw, work, 'lfw112')
    train = os.path.join(work, 'fer2013', 'train')
    files = class_files(train)
    chosen = choose(files, args.percent, args.seed)
    rest = {c: sorted(set(files[c]) - set(chosen[c])) for c in files}
    labeled_name, rest_name, in_domain_name = split_names(args.percent)
    listing = ''.join(f'{c}/{name}\n' for c in chosen for name in chosen[c])
    header = f'# fer2013/train, {args.percent}% per class, seed {args.seed}, {sum(map(len, chosen.values()))} files\n'
    split_file = os.path.join(work, labeled_name, 'split.txt')
    if os.path.exists(split_file):  # never swap the split under finished runs
        with open(split_file) as f:
            if f.read() != header + listing:
                sys.exit(f'{split_file} holds another split (first line: {open(split_file).readline().strip()}); '
                         f'delete {work}/{labeled_name} and {work}/{rest_name}, or pass another --work')
    else:
        for name in (labeled_name, rest_name):
            shutil.rmtree(os.path.join(work, name), ignore_errors=True)  # a half-built tree from an interrupted run
        os.makedirs(os.path.join(work, labeled_name))
        link_tree(train, chosen, os.path.join(work, labeled_name, 'train'))
        link_tree(train, rest, os.path.join(work, rest_name))
        with open(split_file + '.tmp', 'w') as f:
            f.write(header + listing)
        os.replace(split_file + '.tmp', split_file)  # written last: its presence means the trees are complete
    os.makedirs(os.path.join(work, 'full'), exist_ok=True)
    link(os.path.join(work, 'fer2013', 'val'), os.path.join(work, labeled_name, 'val'))
    link(train, os.path.join(work, 'full', 'train'))
    link(os.path.join(work, 'fer2013', 'val'), os.path.join(work, 'full', 'val'))
    os.makedirs(os.path.join(work, in_domain_name), exist_ok=True)
    link(os.path.join(work, rest_name), os.path.join(work, in_domain_name, 'train'))

    identities = os.path.join(work, 'lfw_ids')
    if not os.path.isdir(identities):  # built in a temporary folder and renamed: complete or absent
        lfw_root = os.path.join(work, 'lfw112')
        people = {p: files for p, files in class_files(lfw_root).items() if len(files) >= IDENTITY_MIN}
        shutil.rmtree(identities + '.tmp', ignore_errors=True)
        link_tree(lfw_root, {p: files[:-1] for p, files in people.items()}, os.path.join(identities + '.tmp', 'train'))
        link_tree(lfw_root, {p: files[-1:] for p, files in people.items()}, os.path.join(identities + '.tmp', 'val'))
        os.rename(identities + '.tmp', identities)

    lfw = len(image_files(os.path.join(work, 'lfw112')))
    n = {c: len(v) for c, v in chosen.items()}
    print(f'# {labeled_name}: {sum(n.values())} of {sum(map(len, files.values()))} train images: ' +
          ', '.join(f'{c} {k}/{len(files[c])}' for c, k in n.items()))
    print(f'# split sha256 {hashlib.sha256(listing.encode()).hexdigest()[:16]} ({split_file})')
    print(f'# {rest_name}: {sum(map(len, rest.values()))} images; lfw112: {lfw} images; val: fer2013/val')
    # --grey: FER2013 is grey, LFW colour (a colour face is outside the domain of a model that saw only grey ones);
    # --own-bn: batch statistics mixed from both domains bias the model towards one class on LFW
    # (experiments/fer_lfw/README.md); --lambda-u-warmup 0: the protocol's unlabeled loss is at full weight from step 1
    common = (f'--grey --own-bn --img-size {args.img_size} --steps {args.steps} --batch-size {args.batch_size} '
              f'--mu {args.mu} --lr {args.lr} --lr-warmup {args.lr_warmup} --lambda-u-warmup 0 '
              f'--eval-every {args.eval_every} '
              f'--save-every {args.eval_every}')
    workers = f' --workers {args.workers}' if args.workers is not None else ''
    common += workers
    common += f' {args.extra}' if args.extra else ''
    if args.pretrain:
        # below RUNS/*, so the results table does not take it for a row
        pretrained = os.path.join(args.runs, 'pretrain', 'lfw_ids')
        print(f'# {len(os.listdir(os.path.join(identities, "val")))} LFW identities, '
              f'{len(image_files(os.path.join(identities, "train")))} train photos: pretraining, then every row '
              f'from it')
        print(f'python train.py --data {identities} --grey --img-size {args.img_size} {PRETRAIN}{workers} --seed 0 '
              f'--out {pretrained}')
        common += f' --weights {os.path.join(pretrained, "best.pt")}'
    for seed in args.train_seeds:
        for prefix, (method, threshold, labeled, pools) in protocol_rows(args.percent).items():
            unlabeled = f' --unlabeled {" ".join(os.path.join(work, p) for p in pools)}' if pools else ''
            if args.lfw_labels and 'lfw112' in pools:  # measured only: train.py never trains on them
                unlabeled += f' --pool-labels {args.lfw_labels}'
            print(f'python train.py --data {os.path.join(work, labeled)}{unlabeled} --threshold {threshold} {common} '
                  f'--seed {seed} --out {os.path.join(args.runs, f"{prefix}_s{seed}")}')

# -----------------------------------------------------------------------------
# table


def read_run(path):
    """One run's log: config, best macro F1 and the accuracy of that checkpoint, steps done, and its time."""
    records = read_log(path)
    start = next((r for r in records if r['event'] == 'start'), None)
    if start is None:
        return None  # a run that has not started logging
    evals = [r for r in records if r['event'] == 'eval']
    best = max(evals, key=lambda r: r['macro_f1']) if evals else None  # the checkpoint train.py keeps as best.pt
    config = start['config']
    if all('time' in r for r in records):  # the gap before a resumed run's 'start' is not training time
        seconds = sum(b['time'] - a['time'] for a, b in zip(records, records[1:]) if b['event'] != 'start')
    else:  # no timestamps: sum each train record's interval, images / (images/s). An interval also holds the
        # evaluation and checkpoint just before it, so only startup and the last evaluation are left out
        seconds, last = 0.0, 0
        semi = config['threshold'] != 'none'
        for r in records:
            if r['event'] == 'start':
                last = r['step']
            elif r['event'] == 'train':
                images = (r['step'] - last) * start.get('versions', {}).get('world_size', 1) * config['batch_size'] * \
                    (1 + 2 * config['mu'] * semi)
                seconds += images / max(r['images_per_s'], 1e-9)
                last = r['step']
    steps = max(r['step'] for r in records)
    last_from = max([e['step'] for e in evals if e['step'] < steps] + [0])  # the last evaluation interval
    return dict(log=path, config=config, seed=config['seed'], labeled=start['labeled'], unlabeled=start['unlabeled'],
                steps=steps, finished=records[-1]['event'] == 'end', quality=pseudo_label_quality(records, last_from),
                macro_f1=best and best['macro_f1'], accuracy=best and best['accuracy'], best_step=best and best['step'],
                seconds=seconds)


def pseudo_label_quality(records, last_from):
    """Over the run and over the logging intervals that end after last_from (the last evaluation interval, to the
    nearest logging interval): the share of the unlabeled images accepted (accepted / predicted), the precision of
    the accepted pseudo-labels (accepted and right / accepted with a known true label) and the accuracy of all
    pseudo-labels, accepted or not (right / known: the teacher's own predictions). Counts are summed before
    dividing, so every image weighs the same. None for a supervised run; precision and accuracy None where no true
    label is known."""
    train = [r for r in last_per_step(records, 'train') if 'accepted' in r]
    if not train:
        return None

    def rates(chosen):
        total = {k: sum(sum(r[k]) for r in chosen) for k in ('predicted', 'accepted')}
        known = [r for r in chosen if 'accepted_correct' in r]
        right = {k: sum(sum(r[k]) for r in known) for k in ('labeled', 'accepted_labeled', 'accepted_correct',
                                                               'correct')}
        return dict(accepted=total['accepted'] / total['predicted'] if total['predicted'] else None,
                    precision=right['accepted_correct'] / right['accepted_labeled'] if right['accepted_labeled']
                    else None, accuracy=right['correct'] / right['labeled'] if right['labeled'] else None)
    return dict(run=rates(train), last=rates([r for r in train if r['step'] > last_from]))


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return dict(mean=None, std=None, min=None, max=None)
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values))


def differs(key, config, reference):
    """Whether two runs' configs differ in a setting that changes the result. A flag that an older train.py did not
    have is missing from its log: it counts as equal when the other run left it off (False, None or 0)."""
    if key in ('seed', 'out', 'resume', 'workers', 'in_memory', 'pool_labels'):  # none changes what is trained
        return False
    if key not in config or key not in reference:
        return bool(config.get(key, reference.get(key)))
    return config[key] != reference[key]


def method_name(group, config, groups, protocol):
    """The protocol's name for its rows; for another run (a variant), the name of its method and the settings in
    which it differs from the protocol's row of that method and unlabeled set (or, where that row is missing, from
    another protocol row with the same unlabeled set, the threshold aside)."""
    if group in protocol:
        return protocol[group][0]
    name = next((method for method, t, _, _ in protocol.values() if t == config['threshold']), config['threshold'])
    pools = tuple(os.path.basename(p.rstrip('/')) for p in config.get('unlabeled') or [])
    same_pools = [g for g, (_, _, _, p) in protocol.items() if p == pools and g in groups]
    base = next((g for g in same_pools if protocol[g][1] == config['threshold']), same_pools[0] if same_pools else None)
    if base is None:
        return name
    reference = groups[base][0]['config']
    keys = {**reference, **config}  # a flag either run's train.py lacked counts as left off
    changed = [f'{k}={config.get(k, False)}' for k in keys if k != 'threshold' and differs(k, config, reference)]
    return f'{name}, {" ".join(changed)}' if changed else name


def table(args):
    groups = {}
    for path in sorted(glob.glob(os.path.join(args.runs, '*', 'log.jsonl'))):
        name = os.path.basename(os.path.dirname(path))
        run = read_run(path)
        if run:
            groups.setdefault(re.sub(r'_s\d+$', '', name), []).append(run)
    if not groups:
        sys.exit(f'no {args.runs}/*/log.jsonl')
    protocol, rows = protocol_rows(args.percent), []
    for group in [g for g in protocol if g in groups] + sorted(set(groups) - set(protocol)):  # the protocol's first
        runs, config = groups[group], groups[group][0]['config']
        # only the seeds may differ; a key either log lacks counts too
        differ = {k for r in runs for k in {**config, **r['config']} if differs(k, r['config'], config)}
        pools = [os.path.basename(p.rstrip('/')) for p in config.get('unlabeled') or []]
        rows.append(dict(run=group, method=method_name(group, config, groups, protocol), threshold=config['threshold'],
                         labeled=runs[0]['labeled'],
                         unlabeled=f'{" + ".join(pools)} ({runs[0]["unlabeled"]})' if runs[0]['unlabeled'] else '-',
                         seeds=[r['seed'] for r in runs], finished=sum(r['finished'] for r in runs),
                         steps=max(r['steps'] for r in runs), config_differs=sorted(differ),
                         macro_f1=spread([r['macro_f1'] for r in runs]), accuracy=spread([r['accuracy'] for r in runs]),
                         minutes=spread([r['seconds'] / 60 for r in runs]),
                         quality={span: {k: spread([r['quality'][span][k] for r in runs if r['quality']])
                                         for k in ('accepted', 'precision', 'accuracy')} for span in ('run', 'last')},
                         runs=[{k: v for k, v in r.items() if k != 'config'} for r in runs]))

    def percent(s, n):
        if s['mean'] is None:
            return '-'
        spread = f' ± {100 * s["std"]:.2f} [{100 * s["min"]:.2f}, {100 * s["max"]:.2f}]' if n > 1 else ''
        return f'{100 * s["mean"]:.2f}{spread}'

    def duration(minutes):
        return f'{minutes:.1f} min' if minutes < 120 else f'{minutes / 60:.1f} h'

    lines = ['| run | method | labeled | unlabeled | seeds (done) | steps | macro F1 % mean ± std [min, max] | '
             'accuracy % mean ± std [min, max] | time/run |', '|' + '---|' * 9]
    for r in rows:
        n = len(r['seeds'])
        scored = sum(run['macro_f1'] is not None for run in r['runs'])  # a run before its first evaluation has none
        warn = f' (configs differ: {", ".join(r["config_differs"])})' if r['config_differs'] else ''
        lines.append(f'| {r["run"]}{warn} | {r["method"]} | {r["labeled"]} | {r["unlabeled"]} | '
                     f'{n} ({r["finished"]}) | {r["steps"]} | {percent(r["macro_f1"], scored)} | '
                     f'{percent(r["accuracy"], scored)} | {duration(r["minutes"]["mean"])} |')
    lines.append('\nBest validation (fer2013/val) macro F1 of the EMA model over the evaluations of each run, and the '
                 'accuracy of that same checkpoint; std over seeds (n-1). time/run: mean wall time of the training '
                 'loop.')
    quality = [r for r in rows if r['quality']['run']['accepted']['mean'] is not None]
    if quality:
        lines += ['\n| run | accepted % (run) | precision % (run) | accepted % (last) | precision % (last) | '
                  'teacher accuracy % (last) |', '|' + '---|' * 6]
        for r in quality:
            cells = [percent(r['quality'][span][k], 1) for span, k in (('run', 'accepted'), ('run', 'precision'),
                     ('last', 'accepted'), ('last', 'precision'), ('last', 'accuracy'))]
            lines.append(f'| {r["run"]} | ' + ' | '.join(cells) + ' |')
        lines.append('\nPseudo-labels, mean over seeds: the share of the unlabeled images accepted, the precision of '
                     'the accepted ones (right / accepted, over those whose true label is known) and the accuracy of '
                     'all of them (the teacher\'s own predictions), over the run and over its last evaluation '
                     'interval. Only where the pool\'s labels are known (never trained on).')
    markdown = '\n'.join(lines) + '\n'
    print(markdown)
    with open(os.path.join(args.runs, 'results.md'), 'w') as f:
        f.write(markdown)
    with open(os.path.join(args.runs, 'results.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.runs, 'results.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['run', 'method', 'labeled', 'unlabeled', 'seeds', 'steps', *(f'{m}_{s}' for m in ('f1', 'acc')
                         for s in ('mean', 'std', 'min', 'max')), 'minutes_per_run', 'f1_per_seed',
                         *(f'{k}_{span}' for span in ('run', 'last') for k in ('accepted', 'precision', 'accuracy'))])
        for r in rows:
            writer.writerow([r['run'], r['method'], r['labeled'], r['unlabeled'], len(r['seeds']), r['steps'],
                             *r['macro_f1'].values(), *r['accuracy'].values(), r['minutes']['mean'],
                             ' '.join(f's{run["seed"]}:{run["macro_f1"]}' for run in r['runs']),
                             *(r['quality'][span][k]['mean'] for span in ('run', 'last')
                               for k in ('accepted', 'precision', 'accuracy'))])
    print(f'wrote {args.runs}/results.md, results.json, results.csv', file=sys.stderr)


# -----------------------------------------------------------------------------
# probe: what a trained model makes of the unlabeled faces


def linear_probe_accuracy(features, labels, folds=5, generator=None):
    """k-fold accuracy of a logistic regression (standardised features, L-BFGS, small L2) on binary labels."""
    order = torch.randperm(len(labels), generator=generator)
    correct = 0
    for fold in order.chunk(folds):
        train = torch.ones(len(labels), dtype=torch.bool)
        train[fold] = False
        mean, std = features[train].mean(0), features[train].std(0) + 1e-6
        x, y = (features[train] - mean) / std, labels[train].float()
        weight = torch.zeros(x.shape[1] + 1, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight], max_iter=200, line_search_fn='strong_wolfe')

        def loss():
            optimizer.zero_grad()
            value = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight[:-1] + weight[-1], y) + \
                1e-3 * weight[:-1].square().sum()
            value.backward()
            return value
        optimizer.step(loss)
        with torch.no_grad():
            logits = ((features[fold] - mean) / std) @ weight[:-1] + weight[-1]
            correct += ((logits > 0).long() == labels[fold]).sum().item()
    return correct / len(labels)


def probe(args):
    for flag, path in (('checkpoint', args.checkpoint), ('--unlabeled', args.unlabeled), ('--labeled', args.labeled)):
        if not os.path.exists(path):
            sys.exit(f'probe {flag} {path}: not found (prepare builds data/fer_lfw; pass --unlabeled and --labeled '
                     f'for another --work)')
    import data
    import model
    checkpoint = torch.load(args.checkpoint, map_location='cpu', weights_only=True)
    config, classes = checkpoint['config'], checkpoint['classes']
    net = model.build_model(config['arch'], len(classes))
    net.load_state_dict(checkpoint['ema_model'])
    net.eval()
    trunk = torch.nn.Sequential(*list(net.children())[:-1], torch.nn.Flatten())  # all but fc: the features
    decode = data.Decode(config['img_size'], config.get('grey', False))  # as evaluation sees an image
    generator = torch.Generator().manual_seed(0)

    def features(root):
        files = image_files(root)
        files = [files[i] for i in torch.randperm(len(files), generator=generator)[:args.images].tolist()]
        batches = [torch.stack([decode(formats.open_image(f)) for f in files[i:i + 256]])
                   for i in range(0, len(files), 256)]
        with torch.no_grad():
            return torch.cat([trunk(data.normalize(images)) for images in batches])
    unlabeled, labeled = features(args.unlabeled), features(args.labeled)
    probs = net.fc(unlabeled).softmax(dim=1).detach()
    confidence, predicted = probs.max(dim=1)
    mix = torch.bincount(predicted, minlength=len(classes)) / len(predicted)
    accuracy = linear_probe_accuracy(torch.cat([unlabeled, labeled]), torch.cat(
        [torch.ones(len(unlabeled)), torch.zeros(len(labeled))]).long(), generator=generator)
    result = dict(checkpoint=args.checkpoint, step=checkpoint['step'], images=len(unlabeled),
                  predicted_mix=dict(zip(classes, mix.tolist())), mean_confidence=confidence.mean().item(),
                  confident_0_7=(confidence >= 0.7).float().mean().item(), domain_probe_accuracy=accuracy)
    print(f'{args.checkpoint} (step {result["step"]}), {len(unlabeled)} images of {args.unlabeled}:')
    print('  predicted class mix: ' + ', '.join(f'{c} {v:.2f}' for c, v in result['predicted_mix'].items()))
    print(f'  mean confidence {result["mean_confidence"]:.2f}; confidence >= 0.7: {result["confident_0_7"]:.2f}')
    print(f'  {args.unlabeled} vs {args.labeled}, linear probe on the features, 5-fold accuracy: {accuracy:.3f} '
          f'(0.5: the model cannot tell the two apart)')
    print(json.dumps(result))


def teacher(args):
    """How right a checkpoint's pseudo-labels on a labeled pool are under each batch-norm normalisation the teacher
    could use: the running statistics (as evaluation sees a face) or the batch's own (as --own-bn trains), for the
    live weights (train.py's teacher) and their EMA (the evaluated model). Faces in batches of mu * B, each a weak
    view as in training; accepted = confidence at or above the DTM's threshold for the predicted class (tau for
    a checkpoint of any other policy)."""
    for flag, path in (('checkpoint', args.checkpoint), ('--unlabeled', args.unlabeled), ('--labels', args.labels)):
        if path and not os.path.exists(path):
            sys.exit(f'teacher {flag} {path}: not found')
    import data
    import model
    from dtm import DynamicThreshold
    from sources import pools
    try:
        checkpoint = model.load_file(args.checkpoint)
        config, classes = checkpoint['config'], checkpoint['classes']
    except (ValueError, KeyError, TypeError) as error:
        sys.exit(f'teacher {args.checkpoint}: not a train.py checkpoint ({error})')
    try:
        source = pools.open_pool(args.unlabeled)
        truth = pools.true_labels([source], classes, args.labels)
    except (OSError, ValueError) as error:
        sys.exit(f'teacher: {error}')
    if truth is None:
        sys.exit(f'teacher: no face of {args.unlabeled} has a label among {classes} (--labels CSV gives them)')
    generator = torch.Generator().manual_seed(0)
    known = torch.nonzero(truth >= 0).flatten()
    chosen = known[torch.randperm(len(known), generator=generator)[:args.images]].tolist()
    decode, augment = data.Decode(config['img_size'], config.get('grey', False)), data.Augment(config['img_size'])
    batch = config['mu'] * config['batch_size']
    images = torch.stack([decode(source.read(i)) for i in chosen])
    weak = [augment.weak(images[i:i + batch], generator) for i in range(0, len(images) - batch + 1, batch)]
    labels = truth[chosen][:len(weak) * batch]
    thresholds = torch.full((len(classes),), config['tau'])  # FixMatch's tau for any checkpoint but the DTM's
    if config['threshold'] == 'dtm':
        rule = DynamicThreshold(len(classes), config['dtm_momentum'], config['dtm_min'], config['tau'],
                                config.get('dtm_relative', False))
        rule.load_state_dict(checkpoint['threshold'])
        thresholds = rule.threshold()
    rows = []
    for weights in ('model', 'ema_model'):
        net = model.build_model(config['arch'], len(classes))
        net.load_state_dict(checkpoint[weights])
        for statistics in ('running', 'own batch'):
            net.eval()
            with torch.no_grad(), (model.own_batch_statistics(net) if statistics == 'own batch' else nullcontext()):
                probs = torch.cat([net(data.normalize(w)).softmax(dim=1) for w in weak])
            confidence, predicted = probs.max(dim=1)
            accepted = confidence >= thresholds[predicted]
            right = predicted == labels
            mix = torch.bincount(predicted, minlength=len(classes)) / len(predicted)
            top = sorted(zip(classes, mix.tolist()), key=lambda cm: -cm[1])[:3]
            rows.append(dict(weights='live' if weights == 'model' else 'EMA', statistics=statistics,
                             accuracy=right.float().mean().item(), accepted=accepted.float().mean().item(),
                             precision=right[accepted].float().mean().item() if accepted.any() else None,
                             mean_confidence=confidence.mean().item(), predicted_mix=dict(top)))
    base = torch.bincount(labels, minlength=len(classes)) / len(labels)
    print(f'{args.checkpoint} (step {checkpoint["step"]}, {config["threshold"]}), {len(labels)} labeled faces of '
          f'{args.unlabeled}; their true mix: ' + ', '.join(f'{c} {v:.2f}' for c, v in zip(classes, base.tolist())))
    print('thresholds: ' + ', '.join(f'{c} {t:.2f}' for c, t in zip(classes, thresholds.tolist())))
    print('| weights | batch norm | accuracy | accepted | precision of accepted | mean confidence | predicted (top 3) |')
    print('|---|---|---|---|---|---|---|')
    for r in rows:
        precision = '-' if r['precision'] is None else f'{100 * r["precision"]:.1f}'
        print(f'| {r["weights"]} | {r["statistics"]} | {100 * r["accuracy"]:.1f} | {100 * r["accepted"]:.1f} | '
              f'{precision} | {r["mean_confidence"]:.2f} | ' +
              ', '.join(f'{c} {v:.2f}' for c, v in r['predicted_mix'].items()) + ' |')
    print(json.dumps(dict(checkpoint=args.checkpoint, step=checkpoint['step'], faces=len(labels), rows=rows)))


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('prepare', help='extract or link the data, build the split, print the train.py commands')
    p.add_argument('--fer2013', help='FER2013: a tar or a folder holding train/<class>/ and val/<class>/')
    p.add_argument('--lfw', help='LFW faces (112 px centre crops): a tar or a folder of <Person_Name>/ folders')
    p.add_argument('--work', default='data/fer_lfw', help='where to extract and build (git-ignored)')
    p.add_argument('--percent', type=int, default=PERCENT, help='labeled share of each class of fer2013/train, in %%; '
                   'the rest is the in-domain pool')
    p.add_argument('--seed', type=int, default=0, help='seed of the labeled split')
    p.add_argument('--runs', default='runs/fer_lfw', help='parent of the printed --out folders')
    p.add_argument('--train-seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--steps', type=int, default=1500)  # ~20 min a run, two runs side by side on a 2-core CPU
    p.add_argument('--lr', type=float, default=0.01)  # with --lr-warmup: chosen on supervised-only validation runs
    p.add_argument('--lr-warmup', type=int, default=100)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--mu', type=int, default=3)
    p.add_argument('--img-size', type=int, default=48)
    p.add_argument('--eval-every', type=int, default=500)
    p.add_argument('--workers', type=int)
    p.add_argument('--extra', default='', help='more train.py arguments, appended to every command')
    p.add_argument('--lfw-labels', help='CSV of `file name,class` for the LFW faces: passed to the LFW rows as '
                   '--pool-labels, to log the precision of their pseudo-labels (never trained on)')
    p.add_argument('--pretrain', action='store_true', help='print a face-recognition pretraining run on the LFW '
                   'identities first, and start every row from its weights')
    t = sub.add_parser('table', help='results table from RUNS/*/log.jsonl')
    t.add_argument('--runs', default='runs/fer_lfw')
    t.add_argument('--percent', type=int, default=PERCENT, help="the labeled share prepare was given: the protocol's "
                   'row names')
    r = sub.add_parser('probe', help='a checkpoint on the unlabeled faces: predicted class mix, confidence, and a '
                       'linear probe of labeled vs unlabeled faces on its features')
    r.add_argument('checkpoint')
    r.add_argument('--unlabeled', default='data/fer_lfw/lfw112')
    r.add_argument('--labeled', default='data/fer_lfw/fer2013/val')
    r.add_argument('--images', type=int, default=800, help='images drawn from each')
    e = sub.add_parser('teacher', help="a checkpoint's pseudo-labels on a labeled pool, under the running and under "
                       "the batch's own batch-norm statistics: accuracy, share accepted, precision")
    e.add_argument('checkpoint')
    e.add_argument('--labels', help='CSV of `file name,class` for a folder pool (the LFW expressions); a labeled set '
                   'given as --unlabeled carries its own')
    e.add_argument('--unlabeled', default='data/fer_lfw/lfw112')
    e.add_argument('--images', type=int, default=3000, help='labeled faces drawn from the pool')
    return parser.parse_args(argv)


if __name__ == '__main__':
    args = parse_args()
    {'prepare': prepare, 'table': table, 'probe': probe, 'teacher': teacher}[args.command](args)
