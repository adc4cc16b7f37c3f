"""experiments/fer_lfw/run.py: the real-faces protocol's split (exact, stratified, repeatable, the same from a tar
or a folder), its commands (valid for train.py), its errors, and its results table, on small tars in the layout
experiments/fer_lfw/README.md describes and on hand-written logs."""
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
COUNTS = {'angry': 40, 'disgust': 5, 'happy': 25}  # 10%: 4, 0.5 -> 1 (halves round up), 2.5 -> 3


def run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'fer_lfw', 'run.py'), *args],
                          capture_output=True, text=True, timeout=300)


def add_image(tar, name, size, mode):
    buffer = io.BytesIO()
    Image.new(mode, (size, size), 128).save(buffer, format='PNG' if mode == 'L' else 'JPEG')
    info = tarfile.TarInfo(name)
    info.size = buffer.tell()
    buffer.seek(0)
    tar.addfile(info, buffer)


@pytest.fixture
def tars(tmp_path):
    """fer2013.tar and lfw112.tar, each with its data set in one top folder; returns prepare's data arguments."""
    folder = tmp_path / 'tars'
    folder.mkdir()
    with tarfile.open(folder / 'fer2013.tar', 'w') as tar:
        for c, n in COUNTS.items():
            for i in range(n):
                add_image(tar, f'fer2013/train/{c}/Training_{i:05d}.png', 48, 'L')
            for i in range(3):
                add_image(tar, f'fer2013/val/{c}/PublicTest_{i:05d}.png', 48, 'L')
    with tarfile.open(folder / 'lfw112.tar', 'w') as tar:
        for person, photos in (('Ann_A', 2), ('Bob_B', 2), ('Cy_C', 4), ('Di_D', 5)):
            for i in range(photos):
                add_image(tar, f'lfw112/{person}/{person}_{i + 1:04d}.jpg', 112, 'RGB')
    return ['--fer2013', str(folder / 'fer2013.tar'), '--lfw', str(folder / 'lfw112.tar')]


def test_prepare_builds_an_exact_repeatable_split(tars, tmp_path):
    work = str(tmp_path / 'work')
    result = run('prepare', *tars, '--work', work, '--runs', 'runs/x', '--steps', '7')
    assert result.returncode == 0, result.stderr
    labeled = {c: sorted(os.listdir(os.path.join(work, 'labeled10', 'train', c))) for c in COUNTS}
    assert {c: len(v) for c, v in labeled.items()} == {'angry': 4, 'disgust': 1, 'happy': 3}
    rest = {c: sorted(os.listdir(os.path.join(work, 'rest90', c))) for c in COUNTS}
    for c, n in COUNTS.items():
        assert not set(labeled[c]) & set(rest[c]) and len(labeled[c]) + len(rest[c]) == n
        assert os.path.samefile(os.path.join(work, 'labeled10', 'train', c, labeled[c][0]),
                                os.path.join(work, 'fer2013', 'train', c, labeled[c][0]))
    listing = open(os.path.join(work, 'labeled10', 'split.txt')).read().splitlines()
    assert listing[1:] == [f'{c}/{name}' for c in COUNTS for name in labeled[c]]
    commands = [line for line in result.stdout.splitlines() if line.startswith('python train.py')]
    assert len(commands) == 2 * 12  # 2 seeds x (sup10, 4 methods x 2 pools, FixMatch and DTM in-domain, sup100)
    assert all('--grey --own-bn' in c and '--steps 7' in c for c in commands)
    assert sum(f'--unlabeled {work}/lfw112 {work}/rest90 ' in c for c in commands) == 2 * 4
    assert not any('--weights' in c for c in commands)

    again = run('prepare', *tars, '--work', work)  # idempotent
    assert again.returncode == 0, again.stderr
    assert open(os.path.join(work, 'labeled10', 'split.txt')).read().splitlines() == listing
    other = run('prepare', *tars, '--work', work, '--seed', '1')  # never swaps a split
    assert other.returncode != 0 and 'holds another split' in other.stderr
    fresh = run('prepare', *tars, '--work', str(tmp_path / 'work2'))  # repeatable elsewhere
    assert open(tmp_path / 'work2' / 'labeled10' / 'split.txt').read().splitlines() == listing, fresh.stderr

    # the extracted folders in place of the tars: linked, not copied, and the same split and commands
    folders = ['--fer2013', os.path.join(work, 'fer2013'), '--lfw', os.path.join(work, 'lfw112')]
    linked = run('prepare', *folders, '--work', str(tmp_path / 'work3'), '--runs', 'runs/x', '--steps', '7')
    assert linked.returncode == 0, linked.stderr
    assert os.path.realpath(tmp_path / 'work3' / 'lfw112') == os.path.realpath(os.path.join(work, 'lfw112'))
    assert open(tmp_path / 'work3' / 'labeled10' / 'split.txt').read().splitlines() == listing
    assert [c.replace(str(tmp_path / 'work3'), work) for c in linked.stdout.splitlines()
            if c.startswith('python train.py')] == commands
    # a work folder is never silently reused for another data set
    mixed = run('prepare', *folders[:2], *tars[2:], '--work', str(tmp_path / 'work3'))  # LFW was linked there
    assert mixed.returncode != 0 and mixed.stderr.startswith('--lfw ') and 'pass another --work' in mixed.stderr


def test_prepare_percent_builds_another_split_beside_the_first(tars, tmp_path):
    work = str(tmp_path / 'work')
    ten = run('prepare', *tars, '--work', work, '--runs', 'runs/x')
    assert ten.returncode == 0, ten.stderr
    listing = open(os.path.join(work, 'labeled10', 'split.txt')).read()
    twenty = run('prepare', *tars, '--work', work, '--runs', 'runs/y', '--percent', '20')
    assert twenty.returncode == 0, twenty.stderr
    labeled = {c: sorted(os.listdir(os.path.join(work, 'labeled20', 'train', c))) for c in COUNTS}
    assert {c: len(v) for c, v in labeled.items()} == {'angry': 8, 'disgust': 1, 'happy': 5}  # 20%: 8, 1, 5
    for c, n in COUNTS.items():  # the rest is both the folder pool and the in-domain pool's train split
        rest = set(os.listdir(os.path.join(work, 'rest80', c)))
        assert not rest & set(labeled[c]) and len(rest) + len(labeled[c]) == n
        assert set(os.listdir(os.path.join(work, 'fer80', 'train', c))) == rest
    assert open(os.path.join(work, 'labeled10', 'split.txt')).read() == listing  # the 10% split is untouched
    assert open(os.path.join(work, 'labeled20', 'split.txt')).readline().startswith('# fer2013/train, 20% per class')
    commands = [line for line in twenty.stdout.splitlines() if line.startswith('python train.py')]
    outs = {c.rsplit('--out runs/y/', 1)[1] for c in commands}
    assert {'sup20_s0', 'dtm_fer80_s1', 'fixmatch_lfw_fer80_s0', 'sup100_s1'} <= outs and len(outs) == 2 * 12
    assert all(f'{work}/labeled10' not in c and f'{work}/rest90' not in c for c in commands)
    assert any(f'--data {work}/labeled20 --unlabeled {work}/fer80 --threshold dtm ' in c for c in commands)
    for wrong in ('0', '100'):
        result = run('prepare', *tars, '--work', work, '--percent', wrong)
        assert result.returncode != 0 and result.stderr.startswith(f'--percent {wrong}:')

    runs = tmp_path / 'runs'  # the table names the rows of the share it is given
    write_log(runs / 'sup20_s0', 'none', 0, [0.20], [0.40])
    write_log(runs / 'dtm_fer80_s0', 'dtm', 0, [0.30], [0.45], unlabeled=['x/fer80'], own_bn=True)
    write_log(runs / 'dtm_fer80_balanced_s0', 'dtm', 0, [0.31], [0.45], unlabeled=['x/fer80'], own_bn=True,
              balanced=True)
    result = run('table', '--runs', str(runs), '--percent', '20')
    assert result.returncode == 0, result.stderr
    rows = {r['run']: r['method'] for r in json.load(open(runs / 'results.json'))}
    assert rows == {'sup20': 'supervised', 'dtm_fer80': 'DTM', 'dtm_fer80_balanced': 'DTM, balanced=True'}


def test_prepare_prints_only_flags_that_train_py_accepts(tars, tmp_path):
    result = run('prepare', *tars, '--work', str(tmp_path / 'work'), '--pretrain', '--workers', '1')
    assert result.returncode == 0, result.stderr
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--help'], capture_output=True,
                               text=True, timeout=300, cwd=ROOT).stdout
    accepted = set(re.findall(r'(--[a-z][a-z0-9-]*)', help_text))
    printed = {flag for line in result.stdout.splitlines() if line.startswith('python train.py')
               for flag in re.findall(r'(?<= )(--[a-z][a-z0-9-]*)', line)}
    assert '--own-bn' in printed and '--weights' in printed and printed <= accepted, printed - accepted


def test_prepare_without_its_data_stops_with_one_line(tars, tmp_path):
    result = run('prepare', *tars[:2], '--work', str(tmp_path / 'work'))
    assert result.returncode != 0 and result.stdout == ''
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith('prepare needs --lfw ')
    assert not (tmp_path / 'work').exists()


@pytest.mark.parametrize('case', ['no --fer2013', 'missing file', 'not a tar', 'tar of another layout',
                                  'folder of another layout'])
def test_prepare_mistakes_stop_with_one_message_naming_the_flag(tars, tmp_path, capsys, case):
    from experiments.fer_lfw import run as fer_lfw
    (tmp_path / 'notes.txt').write_text('not a tar')
    with tarfile.open(tmp_path / 'flat.tar', 'w') as tar:  # images, but no train/ and val/
        add_image(tar, 'faces/a.png', 48, 'L')
    args, flag = {'no --fer2013': (tars[2:], '--fer2013'),
                  'missing file': (['--fer2013', str(tmp_path / 'nowhere.tar'), *tars[2:]], '--fer2013'),
                  'not a tar': ([*tars[:2], '--lfw', str(tmp_path / 'notes.txt')], '--lfw'),
                  'tar of another layout': (['--fer2013', str(tmp_path / 'flat.tar'), *tars[2:]], '--fer2013'),
                  'folder of another layout': ([*tars[:2], '--lfw', str(tmp_path)], '--lfw')}[case]
    work = tmp_path / 'work'
    with pytest.raises(SystemExit) as stop:
        fer_lfw.prepare(fer_lfw.parse_args(['prepare', *args, '--work', str(work)]))
    message = str(stop.value.code)  # what Python prints, alone, when SystemExit carries a message
    assert '\n' not in message and message.startswith((f'{flag} ', f'prepare needs {flag} ')), message
    assert capsys.readouterr().out == ''
    assert not (work / 'fer2013').exists() and not any(p.name.startswith('.') for p in work.glob('*')), \
        'nothing half-built is left behind'


def test_prepare_pretrain_builds_the_identities_and_starts_every_row_from_them(tars, tmp_path):
    work = str(tmp_path / 'work')
    result = run('prepare', *tars, '--work', work, '--runs', 'runs/x', '--pretrain')
    assert result.returncode == 0, result.stderr
    identities = os.path.join(work, 'lfw_ids')
    # people with 4+ photos; each one's last photo held out for validation
    assert {p: sorted(os.listdir(os.path.join(identities, 'train', p))) for p in os.listdir(
        os.path.join(identities, 'train'))} == {'Cy_C': [f'Cy_C_{i:04d}.jpg' for i in range(1, 4)],
                                                'Di_D': [f'Di_D_{i:04d}.jpg' for i in range(1, 5)]}
    assert {p: os.listdir(os.path.join(identities, 'val', p)) for p in os.listdir(
        os.path.join(identities, 'val'))} == {'Cy_C': ['Cy_C_0004.jpg'], 'Di_D': ['Di_D_0005.jpg']}
    assert os.path.samefile(os.path.join(identities, 'val', 'Di_D', 'Di_D_0005.jpg'),
                            os.path.join(work, 'lfw112', 'Di_D', 'Di_D_0005.jpg'))
    commands = [line for line in result.stdout.splitlines() if line.startswith('python train.py')]
    assert commands[0].startswith(f'python train.py --data {identities} --grey ')
    assert commands[0].endswith('--out runs/x/pretrain/lfw_ids') and '--threshold none' in commands[0]
    assert len(commands) == 1 + 2 * 12
    assert all('--weights runs/x/pretrain/lfw_ids/best.pt --seed' in c for c in commands[1:])


def test_prepare_in_domain_rows_read_the_other_90_percent_with_its_labels(tars, tmp_path):
    from sources import pools
    work = str(tmp_path / 'work')
    (tmp_path / 'lfw.csv').write_text('image,emotion\nCy_C_0001.jpg,happiness\n')
    result = run('prepare', *tars, '--work', work, '--runs', 'runs/x', '--lfw-labels', str(tmp_path / 'lfw.csv'))
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith('python train.py')]
    for seed in (0, 1):
        for prefix, threshold in (('fixmatch_fer90', 'fixed'), ('dtm_fer90', 'dtm')):
            mine = [c for c in commands if c.endswith(f'--out runs/x/{prefix}_s{seed}')]
            assert len(mine) == 1 and f'--data {work}/labeled10 --unlabeled {work}/fer90 --threshold {threshold} ' \
                in mine[0] and '--pool-labels' not in mine[0]
    # every LFW row, and only they, measure their pseudo-labels against the LFW labels
    assert [c for c in commands if '--pool-labels' in c] == [c for c in commands if f'{work}/lfw112' in c]
    assert all(f'--pool-labels {tmp_path}/lfw.csv ' in c for c in commands if f'{work}/lfw112' in c)
    assert sum(f'{work}/lfw112' in c for c in commands) == 2 * 8
    # the pool: the 90% not in labeled10, each image with the class of its fer2013/train folder, none of the val
    pool = pools.open_pool(os.path.join(work, 'fer90'))
    truth = pools.true_labels([pool], list(COUNTS))
    found = {}
    for i in range(len(pool)):
        target = os.path.realpath(pool.name(i))
        folder, name = os.path.split(target)
        assert os.path.dirname(folder) == os.path.realpath(os.path.join(work, 'fer2013', 'train'))
        assert list(COUNTS)[truth[i]] == os.path.basename(folder)
        found.setdefault(os.path.basename(folder), []).append(name)
    labeled = {c: os.listdir(os.path.join(work, 'labeled10', 'train', c)) for c in COUNTS}
    assert {c: len(v) for c, v in found.items()} == {c: n - len(labeled[c]) for c, n in COUNTS.items()}
    assert not any(set(found[c]) & set(labeled[c]) for c in COUNTS)
    missing = run('prepare', *tars, '--work', work, '--lfw-labels', str(tmp_path / 'nowhere.csv'))
    assert missing.returncode != 0 and missing.stderr.startswith('--lfw-labels ') and missing.stdout == ''


def write_log(folder, threshold, seed, f1s, accuracies, unlabeled=(), resumed=False, **config):
    os.makedirs(folder)
    config = dict(dict(threshold=threshold, seed=seed, unlabeled=list(unlabeled), batch_size=16, mu=3, balanced=False,
                       out=str(folder)), **config)
    records = [dict(event='start', step=0, config=config, labeled=2873, unlabeled=13233 if unlabeled else 0,
                    time=1000.0)]
    for i, (f1, acc) in enumerate(zip(f1s, accuracies)):
        records.append(dict(event='eval', step=100 * (i + 1), macro_f1=f1, accuracy=acc, time=1000.0 + 60 * (i + 1)))
    records.append(dict(event='end', step=100 * len(f1s), time=1000.0 + 60 * len(f1s)))
    if resumed:  # stopped after the first evaluation, resumed from it two hours later
        for r in records[2:]:
            r['time'] += 7200
        records.insert(2, dict(records[0], step=100, time=records[1]['time'] + 7200))
    with open(os.path.join(folder, 'log.jsonl'), 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in records))


def test_table_reports_the_best_checkpoint_mean_and_spread_over_seeds(tmp_path):
    runs = tmp_path / 'runs'
    write_log(runs / 'sup10_s0', 'none', 0, [0.20, 0.30], [0.40, 0.35])
    write_log(runs / 'sup10_s1', 'none', 1, [0.25, 0.22], [0.41, 0.50], resumed=True,
              align=False)  # a flag s0's train.py lacked
    write_log(runs / 'dtm_lfw_s0', 'dtm', 0, [0.31, 0.36], [0.45, 0.47], unlabeled=['x/lfw112'], own_bn=True)
    write_log(runs / 'dtm_lfw_s1', 'dtm', 1, [], [], unlabeled=['x/lfw112'], own_bn=True)  # before its first eval
    write_log(runs / 'dtm_lfw_balanced_s0', 'dtm', 0, [0.40], [0.50], unlabeled=['x/lfw112'], balanced=True,
              own_bn=True)
    write_log(runs / 'dtm_lfw_align_s0', 'dtm', 0, [0.33], [0.44], unlabeled=['x/lfw112'], align=True, own_bn=True)
    write_log(runs / 'dtm_lfw_mixedbn_s0', 'dtm', 0, [0.30], [0.40], unlabeled=['x/lfw112'])  # before --own-bn
    write_log(runs / 'freematch_lfw_old_s0', 'freematch', 0, [0.2], [0.3], unlabeled=['x/lfw112'])  # no FreeMatch row
    write_log(runs / 'fixmatch_lfw_s0', 'fixed', 0, [0.30], [0.40], unlabeled=['x/lfw112'], own_bn=True)
    write_log(runs / 'fixmatch_lfw_s1', 'fixed', 1, [0.30], [0.40], unlabeled=['x/lfw112'])  # a seed run without it
    result = run('table', '--runs', str(runs))
    assert result.returncode == 0, result.stderr
    rows = {r['run']: r for r in json.load(open(runs / 'results.json'))}
    # the protocol's order, then the variants
    assert list(rows) == ['sup10', 'fixmatch_lfw', 'dtm_lfw', 'dtm_lfw_align', 'dtm_lfw_balanced', 'dtm_lfw_mixedbn',
                          'freematch_lfw_old']
    assert rows['freematch_lfw_old']['method'] == 'FreeMatch, own_bn=False'  # named against another LFW row
    assert rows['fixmatch_lfw']['config_differs'] == ['own_bn']  # seeds of one row that are not the same run
    sup = rows['sup10']
    assert sup['macro_f1']['mean'] == pytest.approx(0.275) and sup['macro_f1']['std'] == pytest.approx(
        statistics.stdev([0.30, 0.25]))
    assert sup['accuracy']['mean'] == pytest.approx((0.35 + 0.41) / 2)  # the accuracy of the best-F1 checkpoint
    assert sup['minutes']['mean'] == pytest.approx(2.0) and sup['seeds'] == [0, 1] and sup['finished'] == 2
    assert rows['dtm_lfw']['method'] == 'DTM' and rows['dtm_lfw']['macro_f1']['std'] == 0.0
    assert rows['dtm_lfw_balanced']['method'] == 'DTM, balanced=True'
    assert rows['dtm_lfw_align']['method'] == 'DTM, align=True' and sup['config_differs'] == []
    assert rows['dtm_lfw_mixedbn']['method'] == 'DTM, own_bn=False'  # a flag only the protocol's row has
    csv = open(runs / 'results.csv').read().splitlines()
    assert csv[0].startswith('run,method') and len(csv) == 8
    markdown = open(runs / 'results.md').read()
    assert '| sup10 | supervised |' in markdown
    assert '| dtm_lfw | DTM | 2873 | lfw112 (13233) | 2 (2) | 200 | 36.00 | 47.00 |' in markdown  # no spread of one


def test_linear_probe_tells_apart_only_what_differs():
    import torch

    from experiments.fer_lfw import run as fer_lfw
    generator = torch.Generator().manual_seed(0)
    same = torch.randn(400, 16, generator=generator)
    labels = torch.arange(400) % 2
    assert abs(fer_lfw.linear_probe_accuracy(same, labels, generator=generator) - 0.5) < 0.1
    shifted = same + labels[:, None] * torch.tensor([1.5] + [0.0] * 15)  # one feature differs by 1.5 sigma
    assert fer_lfw.linear_probe_accuracy(shifted, labels, generator=generator) > 0.7


def test_table_reports_pseudo_label_quality_over_the_run_and_the_last_interval(tmp_path):
    runs = tmp_path / 'runs'
    write_log(runs / 'dtm_fer90_s0', 'dtm', 0, [0.30, 0.35], [0.40, 0.45], unlabeled=['x/fer90'], own_bn=True)
    write_log(runs / 'sup10_s0', 'none', 0, [0.30, 0.32], [0.40, 0.41])
    # two classes; train records at steps 50, 100 (first evaluation interval) and 150, 200 (the last one)
    counts = {50: ([40, 20], [2, 0], [40, 20], [2, 0], [1, 0], [10, 5]),
              100: ([30, 30], [6, 4], [30, 30], [6, 4], [3, 4], [12, 10]),
              150: ([20, 40], [10, 10], [10, 20], [5, 5], [5, 2], [8, 15]),
              200: ([25, 35], [12, 8], [25, 35], [12, 8], [9, 6], [15, 20])}
    path = runs / 'dtm_fer90_s0' / 'log.jsonl'
    records = [json.loads(line) for line in open(path)]
    keys = ('predicted', 'accepted', 'labeled', 'accepted_labeled', 'accepted_correct', 'correct')
    records[1:1] = [dict(event='train', step=step, time=1000.0, images_per_s=1.0, **dict(zip(keys, c)))
                    for step, c in counts.items()]
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    result = run('table', '--runs', str(runs))
    assert result.returncode == 0, result.stderr
    rows = {r['run']: r for r in json.load(open(runs / 'results.json'))}
    quality = rows['dtm_fer90']['quality']
    # by hand: accepted 2+10+20+20 of 240 predicted; right 1+7+7+15 of 2+10+10+20 accepted with a known label
    assert quality['run']['accepted']['mean'] == pytest.approx(52 / 240)
    assert quality['run']['precision']['mean'] == pytest.approx(30 / 42)
    assert quality['run']['accuracy']['mean'] == pytest.approx(95 / 210)
    assert quality['last']['accepted']['mean'] == pytest.approx(40 / 120)  # steps 150 and 200 only
    assert quality['last']['precision']['mean'] == pytest.approx(22 / 30)
    assert quality['last']['accuracy']['mean'] == pytest.approx(58 / 90)
    assert rows['sup10']['quality']['run']['accepted']['mean'] is None
    assert '| dtm_fer90 | 21.67 | 71.43 | 33.33 | 73.33 | 64.44 |' in open(runs / 'results.md').read()


def test_teacher_reports_pseudo_labels_under_both_normalisations(tmp_path):
    """run.py teacher on a hand-made checkpoint: with threshold 0 every pseudo-label is accepted, so precision equals
    accuracy; live and EMA weights that are equal give equal rows; running statistics far from the batch's give other
    predictions than the batch's own; faces without a label (or of a class the model lacks) are left out."""
    import torch
    from model import build_model
    generator = torch.Generator().manual_seed(0)
    lines = ['image,emotion']
    for i in range(40):
        person = tmp_path / 'pool' / f'P_{i % 5}'
        person.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(pixels).save(person / f'P_{i % 5}_{i:04d}.jpg')
        lines += [f'P_{i % 5}_{i:04d}.jpg,{("angry", "Happiness", "contempt", "disgust")[i % 4]}'] if i % 5 else []
    (tmp_path / 'labels.csv').write_text('\n'.join(lines) + '\n')
    net = build_model('resnet18', 3)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(3.0)  # far from any batch's own mean
    config = dict(arch='resnet18', img_size=32, grey=True, mu=2, batch_size=4, threshold='fixed', tau=0.0)
    torch.save(dict(config=config, classes=['angry', 'disgust', 'happy'], step=7, model=net.state_dict(),
                    ema_model=net.state_dict(), threshold={}), tmp_path / 'best.pt')
    result = run('teacher', str(tmp_path / 'best.pt'), '--unlabeled', str(tmp_path / 'pool'), '--labels',
                 str(tmp_path / 'labels.csv'), '--images', '100')
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['faces'] == 24  # 32 labeled lines, 8 of them contempt; whole batches of mu * B = 8
    rows = {(r['weights'], r['statistics']): r for r in report['rows']}
    assert set(rows) == {(w, s) for w in ('live', 'EMA') for s in ('running', 'own batch')}
    for (weights, statistics), row in rows.items():
        assert row['accepted'] == 1.0 and row['precision'] == pytest.approx(row['accuracy'])
        assert row == dict(rows[('live', statistics)], weights=weights)
    assert rows[('live', 'running')]['predicted_mix'] != rows[('live', 'own batch')]['predicted_mix'] or \
        rows[('live', 'running')]['mean_confidence'] != pytest.approx(rows[('live', 'own batch')]['mean_confidence'])


def test_the_gpu_script_rehearsed_on_the_cpu(tars, tmp_path):
    """gpu.py pack, then run --rehearse: every part (bench, the budget search, the rows, evaluate.py, the table and
    the plots) runs and writes its files; a pack that is not the manifest's stops it before anything runs."""
    gpu = os.path.join(ROOT, 'experiments', 'fer_lfw', 'gpu.py')
    packed, out = str(tmp_path / 'packed'), str(tmp_path / 'out')
    result = subprocess.run([sys.executable, gpu, 'pack', *tars, '--out', packed], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    manifest = json.load(open(os.path.join(packed, 'manifest.json')))
    assert manifest['counts'] == {'fer2013/train': 70, 'fer2013/val': 9, 'lfw48': 13}
    result = subprocess.run([sys.executable, gpu, 'run', '--packed', packed, '--out', out, '--rehearse', '--budgets',
                             '2', '--seeds', '0'], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr + result.stdout
    summary = json.load(open(os.path.join(out, 'summary.json')))
    assert [p['name'] for p in summary['parts']] == ['bench', 'pretrain', 'budget', 'rows']
    assert summary['parts'][2]['chosen'] == 2 and set(summary['parts'][3]['macro_f1']) == {
        'sup10_s0', 'sup100_s0', 'fixmatch_fer90_s0', 'dtm_fer90_s0', 'dtm_lfw_s0'}
    for b in (16, 64):
        assert 'end_to_end' in json.load(open(os.path.join(out, 'bench', f'b{b}.json')))
    assert '--weights' in summary['parts'][3]['commands'][0]  # every row from the pretraining's weights
    assert os.path.isfile(os.path.join(out, 'pretrain', 'lfw_ids', 'best.pt'))
    for name in ('results.md', 'results.json', 'curves.png', 'dtm_lfw_s0.png', 'dtm_fer90_s0/val.json'):
        assert os.path.isfile(os.path.join(out, 'rows', name)), name
    with open(os.path.join(packed, 'lfw48.tar.gz'), 'ab') as f:  # a pack that changed on its way
        f.write(b'\0')
    result = subprocess.run([sys.executable, gpu, 'run', '--packed', packed, '--out', str(tmp_path / 'again'),
                             '--rehearse'], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and 'lfw48.tar.gz' in result.stderr and len(result.stderr.splitlines()) == 1
    assert not os.path.exists(tmp_path / 'again')
