"""
Every GPU measurement and run this project needs, in one command on one CUDA GPU, written under one folder.

    python experiments/fer_lfw/gpu.py pack --fer2013 PATH --lfw PATH --out packed/     here: the data, compact
    python experiments/fer_lfw/gpu.py run --packed packed/ --out OUT                   there: everything below
    python experiments/fer_lfw/gpu.py run --packed packed/ --out OUT --rehearse        the same on the CPU, tiny

`pack` writes what the GPU machine needs and nothing more: FER2013's JPEG files as they are (fer2013.tar.gz), the LFW
faces as the protocol reads them (48 px grey, re-encoded as JPEG: lfw48.tar.gz) and manifest.json (files, bytes and
sha256 of each). `run` checks the packs against the manifest before anything starts, pretrains the backbone on the
LFW identities as the protocol does (`run.py prepare --pretrain`; --scratch skips it), then:
  1. bench: `tools/bench.py --json` at B=16 and B=64, 48 and 112 px, mu=7, default workers (OUT/bench/);
  2. budget: supervised 10% and 100% side by side at each --budgets step count; the protocol's budget is the
     smallest at which all the labels beat 10% of them by --bind points of validation macro F1 (OUT/budget/);
  3. rows at that budget, every seed, all side by side on the GPU, data kept decoded there: supervised 10% and
     100%, FixMatch and the DTM with the in-domain pool (FER2013's other 90%), the DTM with LFW (OUT/rows/);
  4. each row's best checkpoint evaluated with evaluate.py on fer2013/val; `run.py table`; one plot of every row's
     learning curve; each run's thresholds and pseudo-label precision (OUT/rows/).
OUT/summary.json says what ran, the device, the commit, the commands and how long each part took.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
PACKS = ('fer2013.tar.gz', 'lfw48.tar.gz')


def sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# pack: here, where the data sets are


def pack(args):
    import data
    from PIL import Image
    from sources import formats
    sys.path.insert(0, HERE)
    from run import install
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, '.work')
    os.makedirs(work, exist_ok=True)
    install(args.fer2013, work, 'fer2013')
    install(args.lfw, work, 'lfw112')
    fer, lfw = os.path.join(work, 'fer2013'), os.path.join(work, 'lfw112')
    counts = {}
    with tarfile.open(os.path.join(args.out, PACKS[0]), 'w:gz') as tar:  # gzip: the tar's padding, not the JPEGs
        for split in ('train', 'val'):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(fer, split)) for f in fs)
            counts[f'fer2013/{split}'] = len(files)
            for path in files:
                tar.add(path, arcname=os.path.join('fer2013', os.path.relpath(path, fer)))
    decode, lfw48 = data.Decode(48, grey=True), os.path.join(work, 'lfw48')
    people = sorted(os.listdir(lfw))  # install put the data set's root there
    for person in people:  # the pixels the protocol's train.py makes of each face, kept as a grey JPEG
        os.makedirs(os.path.join(lfw48, person), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(lfw, person))):
            image = decode(formats.open_image(os.path.join(lfw, person, name)))[0].numpy()
            Image.fromarray(image).save(os.path.join(lfw48, person, name), quality=args.lfw_quality)
    counts['lfw48'] = sum(len(os.listdir(os.path.join(lfw48, p))) for p in people)
    with tarfile.open(os.path.join(args.out, PACKS[1]), 'w:gz') as tar:
        tar.add(lfw48, arcname='lfw48')
    shutil.rmtree(work)
    manifest = dict(counts=counts, lfw_quality=args.lfw_quality,
                    files={name: dict(bytes=os.path.getsize(os.path.join(args.out, name)),
                                      sha256=sha256(os.path.join(args.out, name))) for name in PACKS})
    with open(os.path.join(args.out, 'manifest.json'), 'w') as f:
        json.dump(manifest, f, indent=1)
    total = sum(v['bytes'] for v in manifest['files'].values())
    print(f'{args.out}: {", ".join(f"{k} {v}" for k, v in counts.items())}; {total / 2 ** 20:.1f} MiB in all')


# -----------------------------------------------------------------------------
# run: there, on the GPU


def check_packs(packed):
    """Every pack the manifest names is there with its bytes and sha256: one line and exit 1 otherwise."""
    manifest_path = os.path.join(packed, 'manifest.json')
    if not os.path.isfile(manifest_path):
        sys.exit(f'--packed {packed}: no manifest.json (make the packs with `gpu.py pack`)')
    with open(manifest_path) as f:
        manifest = json.load(f)
    for name, expected in manifest['files'].items():
        path = os.path.join(packed, name)
        if not os.path.isfile(path) or os.path.getsize(path) != expected['bytes'] or sha256(path) != expected['sha256']:
            sys.exit(f'--packed {packed}: {name} is missing or not the file manifest.json describes; pack again')
    return manifest


class Log:
    """Every command and its time, in OUT/summary.json, rewritten after each part."""

    def __init__(self, out, config):
        self.path, self.summary = os.path.join(out, 'summary.json'), dict(config=config, parts=[])

    def part(self, name, commands, **found):
        self.summary['parts'].append(dict(name=name, commands=commands, **found))
        with open(self.path, 'w') as f:
            json.dump(self.summary, f, indent=1)


def side_by_side(commands, out, name):
    """Run the commands at once (the GPU is shared), each logging to OUT/logs/NAME_k.txt; seconds taken."""
    os.makedirs(os.path.join(out, 'logs'), exist_ok=True)
    start, running = time.time(), []
    for k, command in enumerate(commands):
        log = open(os.path.join(out, 'logs', f'{name}_{k}.txt'), 'w')
        running.append((subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, shell=True), log))
    failed = []
    for k, (process, log) in enumerate(running):
        if process.wait() != 0:
            failed.append(k)
        log.close()
    if failed:
        sys.exit(f'{name}: command {failed[0]} failed: {commands[failed[0]]} (see {out}/logs/{name}_{failed[0]}.txt)')
    return time.time() - start


def prepare_commands(work, runs, steps, eval_every, seeds, extra, pretrain=False):
    """run.py prepare's train.py commands, by run name (the pretraining's: lfw_ids)."""
    command = [sys.executable, os.path.join(HERE, 'run.py'), 'prepare', '--fer2013', os.path.join(work, 'fer2013'),
               '--lfw', os.path.join(work, 'lfw48'), '--work', work, '--runs', runs, '--steps', str(steps),
               '--eval-every', str(eval_every), '--train-seeds', *map(str, seeds), '--extra', extra,
               *(['--pretrain'] if pretrain else [])]
    lines = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True).stdout.splitlines()
    return {line.split('--out ')[-1].split()[0].rsplit('/', 1)[-1]: line for line in lines if line.startswith('python')}


def best_f1(run_dir):
    from tools.plot_log import read_log
    scores = [r['macro_f1'] for r in read_log(os.path.join(run_dir, 'log.jsonl')) if r['event'] == 'eval']
    return max(scores) if scores else None


def run(args):
    import torch
    manifest = check_packs(args.packed)
    if not args.rehearse and not torch.cuda.is_available():
        sys.exit('run: no CUDA GPU here; --rehearse runs the same parts on the CPU with a tiny budget')
    os.makedirs(args.out, exist_ok=True)
    commit = subprocess.run(['git', 'describe', '--always', '--dirty', '--exclude', '*'], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip() or None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
    log = Log(args.out, dict(device=device, commit=commit, torch=torch.__version__, rehearse=args.rehearse,
                             counts=manifest['counts'], argv=sys.argv))
    work = os.path.join(args.out, 'data')
    os.makedirs(work, exist_ok=True)
    for name in PACKS:
        with tarfile.open(os.path.join(args.packed, name)) as tar:
            tar.extractall(work, filter='data')
    python = sys.executable

    # 1. bench
    bench = os.path.join(args.out, 'bench')
    os.makedirs(bench, exist_ok=True)
    quick = ' --quick' if args.rehearse else ''
    commands = [f'{python} tools/bench.py --json --batch-size {b}{quick} > {bench}/b{b}.json' for b in (16, 64)]
    seconds = sum(side_by_side([c], args.out, f'bench_b{b}') for c, b in zip(commands, (16, 64)))  # one at a time
    log.part('bench', commands, seconds=seconds)

    # the protocol's face-recognition pretraining on the LFW identities; every run then starts from its weights
    # runs share the machine: a few loader workers each (a set kept decoded on the GPU needs them to decode it once)
    extra = ' --workers 1' if args.rehearse else ' --workers 2'
    if args.pretrain:
        command = prepare_commands(work, args.out, 1, 1, [0], extra, pretrain=True)['lfw_ids']
        if args.rehearse:
            command = command.replace('--steps 1500', '--steps 2')
        log.part('pretrain', [command], seconds=side_by_side([command], args.out, 'pretrain'))
        extra += f' --weights {os.path.join(args.out, "pretrain", "lfw_ids", "best.pt")}'

    # 2. the budget where labels bind: supervised 10% against 100%, each budget side by side
    budgets, chosen, found = args.budgets, None, {}
    runs = os.path.join(args.out, 'budget')
    commands = []
    for steps in budgets:
        rows = prepare_commands(work, os.path.join(runs, str(steps)), steps, max(steps // 4, 1), [0], extra)
        commands += [rows['sup10_s0'], rows['sup100_s0']]
    seconds = side_by_side(commands, args.out, 'budget')
    for steps in budgets:
        ten, full = (best_f1(os.path.join(runs, str(steps), f'{row}_s0')) for row in ('sup10', 'sup100'))
        found[steps] = dict(sup10=ten, sup100=full, gap=100 * (full - ten))
        if chosen is None and found[steps]['gap'] >= args.bind:
            chosen = steps
    chosen = chosen or budgets[-1]  # none binds: the largest, and the summary says so
    log.part('budget', commands, seconds=seconds, macro_f1=found, chosen=chosen,
             binds=found[chosen]['gap'] >= args.bind)

    # 3. the rows at that budget, every seed at once, then 4. evaluate.py on each best checkpoint
    runs = os.path.join(args.out, 'rows')
    rows = prepare_commands(work, runs, chosen, max(chosen // 8, 1), args.seeds, extra)
    names = [f'{row}_s{seed}' for seed in args.seeds for row in ('sup10', 'sup100', 'fixmatch_fer90', 'dtm_fer90',
                                                                   'dtm_lfw')]
    seconds = side_by_side([rows[name] for name in names], args.out, 'rows')
    val = os.path.join(work, 'fer2013')
    evaluations = [f'{python} evaluate.py {runs}/{name}/best.pt --data {val} --split val --out {runs}/{name}/val.json'
                   f'{" --workers 1" if args.rehearse else ""} > {runs}/{name}/evaluate.txt' for name in names]
    side_by_side(evaluations, args.out, 'evaluate')
    table = f'{python} {HERE}/run.py table --runs {runs} > /dev/null'
    plots = [f'{python} tools/plot_log.py {" ".join(f"{runs}/{n}/log.jsonl" for n in names)} -o {runs}/curves.png',
             *[f'{python} tools/plot_log.py {runs}/{n}/log.jsonl -o {runs}/{n}.png' for n in names
               if not n.startswith('sup')]]
    side_by_side([table, *plots], args.out, 'tables')
    log.part('rows', [rows[name] for name in names] + evaluations + [table] + plots, seconds=seconds, steps=chosen,
             macro_f1={name: best_f1(os.path.join(runs, name)) for name in names})
    print(f'{args.out}: bench/, budget/, rows/ (results.md, curves.png), summary.json')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('pack', help='the data the GPU run needs, compact, with a manifest')
    p.add_argument('--fer2013', required=True, help='FER2013: a tar or a folder of train/<class>/ and val/<class>/')
    p.add_argument('--lfw', required=True, help='LFW faces: a tar or a folder of <Person_Name>/ folders')
    p.add_argument('--out', required=True)
    p.add_argument('--lfw-quality', type=int, default=90, help='JPEG quality of the 48 px grey LFW faces')
    r = sub.add_parser('run', help='every GPU measurement and run, under --out')
    r.add_argument('--packed', required=True, help='the folder `pack` wrote')
    r.add_argument('--out', required=True)
    r.add_argument('--budgets', type=int, nargs='+', default=[4000, 8000],
                   help='step counts tried for the budget where labels bind')
    r.add_argument('--bind', type=float, default=3.0, help='points of macro F1 all labels must gain over 10%%')
    r.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    r.add_argument('--scratch', dest='pretrain', action='store_false',
                   help='every run from random weights (default: from the LFW-identity pretraining, as the protocol)')
    r.add_argument('--rehearse', action='store_true', help='on the CPU, tiny budgets: that every part runs')
    args = parser.parse_args(argv)
    if args.command == 'run' and args.rehearse and args.budgets == r.get_default('budgets'):
        args.budgets = [4, 8]
    (pack if args.command == 'pack' else run)(args)


if __name__ == '__main__':
    main()
