"""
The method, checked against an independent computation on real steps of train.py:
  - what a step backpropagates is L = mean_b CE(f(weak(x_b)), y_b) + lambda_u/(mu B) sum_b mask_b CE(f(strong(u_b)),
    pseudo_b), with (pseudo, mask) made from softmax(teacher(weak(u))) without a graph;
  - the weight EMA follows e_k = d_k e_{k-1} + (1 - d_k) w_k, d_k = min(ema, (1 + k) / (10 + k));
  - every --threshold policy trains end to end and resumes from a mid-run checkpoint bit for bit;
  - where the pool's true labels are known, the logged pseudo-label counts are those of the step's own pseudo-labels,
    and a pool without labels trains the same.
train.py runs as a subprocess through a hook script that records its tensors, on a tiny generated face set.
"""
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dtm import unlabeled_loss
from model import build_model
from sources.faces import generate_faces
from test_resume import assert_identical  # pytest puts the tests' folder on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
TRAIN = os.path.join(ROOT, 'train.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1')
BATCH, MU, LAMBDA_U, RAMP, EMA, STEPS, RECORDED = 4, 2, 2.0, 1, 0.27, 4, 2

# Records what train.py does in its first RECORDED steps: every forward of the model or its EMA (input, output and
# whether the output has a graph), every call of the threshold (the probabilities it receives, what it returns and
# the step's batches), every loss handed to GradScaler.scale (what backward() differentiates), the initial weights
# and the weights after every optimizer step.
HOOK = f'''
import os, runpy, sys, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
sys.path.insert(0, {ROOT!r})
import dtm, model as model_module
record = dict(forwards=[], thresholds=[], losses=[], weights=[])
train = {{}}  # train.py's globals, live

def recording():
    return train['g'].get('step', 0) < {RECORDED}

def on_forward(module, inputs, output):
    g = train['g']
    who = 'model' if module is g.get('raw_model') else 'ema_model' if module is g.get('ema_model') else None
    if who and recording():
        record['forwards'].append(dict(step=g['step'], who=who, training=module.training, input=inputs[0].clone(),
                                       output=output.detach().clone(), graph=output.requires_grad))

build_model = model_module.build_model
def build_and_watch(*args, **kwargs):
    net = build_model(*args, **kwargs)
    train['g'] = sys._getframe(1).f_globals
    record['initial'] = {{k: v.clone() for k, v in net.state_dict().items()}}
    net.register_forward_hook(on_forward)  # deepcopy carries it to the EMA model
    return net
model_module.build_model = build_and_watch

threshold_forward = dtm.FixedThreshold.forward
def watch_threshold(self, probs, index=None):
    pseudo, mask = threshold_forward(self, probs, index)
    g = train['g']
    if recording():
        record['thresholds'].append(dict(
            step=g['step'], probs=probs.detach().clone(), probs_graph=probs.requires_grad, pseudo=pseudo.clone(),
            mask=mask.clone(), **{{k: g[name].clone() for k, name in (('images', 'x_weak'), ('labels', 'y'),
                                   ('weak', 'u_weak'), ('strong', 'u_strong'), ('index', 'index'))}}))
    return pseudo, mask
dtm.FixedThreshold.forward = watch_threshold

scale = torch.amp.GradScaler.scale
def watch_scale(self, outputs):
    if recording():
        record['losses'].append(dict(step=train['g']['step'], loss=outputs.detach().clone(),
                                     graph=outputs.requires_grad))
    return scale(self, outputs)
torch.amp.GradScaler.scale = watch_scale

register_optimizer_step_post_hook(lambda optimizer, args, kwargs: record['weights'].append(
    {{k: v.clone() for k, v in train['g']['raw_model'].state_dict().items()}}))

sys.argv = [{TRAIN!r}, *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name='__main__')
torch.save(record, os.environ['RECORD'])
'''

# Runs train.py several times in one process (one import of torch): each command of a JSON file, in order. A copy of
# every last.pt is kept as last.STEP.pt: the checkpoint a run killed after that step would leave behind.
DRIVER = f'''
import json, os, runpy, shutil, sys, traceback
sys.path.insert(0, {ROOT!r})
replace = os.replace
def replace_and_keep(src, dst):
    replace(src, dst)
    if os.path.basename(dst) == 'last.pt':
        frame = sys._getframe(1)
        while 'step' not in frame.f_globals:  # up to train.py's module frame, whose step is saved
            frame = frame.f_back
        shutil.copyfile(dst, dst[:-3] + '.' + str(frame.f_globals['step']) + '.pt')
os.replace = replace_and_keep
commands, results = json.load(open(sys.argv[1])), {{}}
for name, argv in commands.items():
    sys.argv = [{TRAIN!r}, *argv]
    try:
        runpy.run_path(sys.argv[0], run_name='__main__')
        results[name] = 'ok'
    except BaseException:  # SystemExit included: a run's failure must not hide the other runs
        results[name] = traceback.format_exc()
json.dump(results, open(os.environ['RESULTS'], 'w'))
'''


@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('data') / 'faces')
    generate_faces(root, counts=(32, 16, 64), identities=(4, 4, 8))
    return root


def tiny(faces, out, *extra):
    return ['--data', faces, '--unlabeled', os.path.join(faces, 'unlabeled'), '--img-size', '32',
            '--batch-size', str(BATCH), '--mu', str(MU), '--workers', '0', '--seed', '3', '--out', str(out), *extra]


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


# -----------------------------------------------------------------------------
# the semi-supervised loss of a real step

# --dtm-momentum 0: T(c) is the mean confidence of this batch's predictions of c, so some pseudo-labels fall below it
# and some do not: a mask that is neither all 0 nor all 1, which tells 1/(mu B) from 1/(number accepted).
# --dtm-min 0: no floor holds the threshold above every confidence of the untrained model. --lambda-u 2: a dropped
# weight shows; --lambda-u-warmup 1 ramps it: half at step 0, whole at step 1. --ema 0.27 for the EMA check below:
# d_k = 2/11, 3/12, then 0.27, so both sides of the min show.
VARIANTS = {'concat': (), 'own_bn': ('--own-bn',), 'ema_teacher': ('--teacher', 'ema')}
STEP_FLAGS = ('--steps', str(STEPS), '--dtm-min', '0', '--dtm-momentum', '0', '--lambda-u', str(LAMBDA_U),
              '--lambda-u-warmup', str(RAMP), '--ema', str(EMA))


@pytest.fixture(scope='module')
def recorded(faces, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('step')

    def run(name):
        result = subprocess.run([sys.executable, '-c', HOOK, *tiny(faces, tmp / name, *STEP_FLAGS, *VARIANTS[name])],
                                cwd=tmp, env=dict(ENV, RECORD=str(tmp / f'{name}.pt')), capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return name, dict(load(tmp / f'{name}.pt'), checkpoint=load(tmp / name / 'last.pt'))
    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, VARIANTS))


def cross_entropy(logits, targets):
    """-log softmax(logits)[target] per row, in float64, by hand."""
    logits = logits.double()
    log_probs = logits - logits.logsumexp(dim=1, keepdim=True)
    return -log_probs.gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize('variant', VARIANTS)
def test_backpropagated_loss_is_the_method(recorded, variant):
    record = recorded[variant]
    assert [t['step'] for t in record['thresholds']] == [t['step'] for t in record['losses']] == list(range(RECORDED))
    informative = False
    for threshold, loss in zip(record['thresholds'], record['losses']):
        step = threshold['step']
        images, labels, weak, strong = (threshold[k] for k in ('images', 'labels', 'weak', 'strong'))
        assert len(images) == len(labels) == BATCH and len(weak) == len(strong) == MU * BATCH
        assert not torch.equal(weak, strong), 'the weak and strong views must be different augmentations'
        forwards = [f for f in record['forwards'] if f['step'] == step]

        # the targets: softmax of the teacher's output on the weak view, made without a graph
        teacher = forwards[0]
        assert torch.equal(teacher['input'], weak), 'the first forward of a step is not the teacher on the weak view'
        assert not teacher['graph'], 'the weak view was forwarded with a graph'
        if variant == 'ema_teacher':
            assert teacher['who'] == 'ema_model' and not teacher['training']  # the EMA in eval mode
        else:
            assert teacher['who'] == 'model' and teacher['training']
        if variant == 'own_bn':  # the teacher reads the weak view through the running statistics, as evaluation does
            net = build_model('resnet18', teacher['output'].shape[1])
            net.load_state_dict(record['initial'] if step == 0 else record['weights'][step - 1])
            with torch.no_grad():
                assert torch.allclose(net.eval()(weak), teacher['output'], atol=1e-5)
                assert not torch.allclose(net.train()(weak), teacher['output'], atol=1e-3)  # batch statistics differ
        assert not threshold['probs_graph'], 'the threshold received probabilities with a graph'
        assert torch.allclose(threshold['probs'], teacher['output'].double().softmax(dim=1).float(), atol=1e-6)

        # (pseudo, mask): the argmax, accepted where its confidence reaches T(c); with --dtm-momentum 0 and
        # --dtm-min 0, T(c) = min(tau, the mean confidence of this batch's predictions of c)
        confidence, pseudo = threshold['probs'].double().max(dim=1)
        assert torch.equal(threshold['pseudo'], pseudo)
        for c in pseudo.unique():
            rows = pseudo == c
            t = min(0.95, confidence[rows].mean().item())
            clear = (confidence[rows] - t).abs() > 1e-6  # away from the threshold, rounding cannot decide
            assert torch.equal(threshold['mask'][rows][clear], (confidence[rows][clear] >= t).float())
        mask = threshold['mask'].double()

        # the forwards with a graph: [labeled, strong] at once, or with --own-bn one after the other
        graph = [f for f in forwards if f['graph']]
        assert all(f['who'] == 'model' and f['training'] for f in graph)
        if variant == 'own_bn':
            assert [len(f['input']) for f in graph] == [BATCH, MU * BATCH]
            (x, logits_x), (u, logits_u) = ((f['input'], f['output']) for f in graph)
        else:
            assert len(graph) == 1
            x, u = graph[0]['input'].split([BATCH, MU * BATCH])
            logits_x, logits_u = graph[0]['output'].split([BATCH, MU * BATCH])
        assert torch.equal(x, images) and torch.equal(u, strong), 'the graph is not of the labeled and strong views'
        assert len(forwards) == 1 + len(graph), 'one forward of the weak view, the rest with a graph'

        # L = L_s + lambda_u(k) L_u, recomputed here; --lambda-u-warmup 1: lambda_u / 2 at step 0, then lambda_u
        lambda_u = LAMBDA_U * min(1, (step + 1) / (RAMP + 1))
        loss_s = cross_entropy(logits_x, labels).mean()
        loss_u = (mask * cross_entropy(logits_u, pseudo)).sum() / (MU * BATCH)
        # a step whose mask is neither all 0 nor all 1 tells 1/(mu B) from 1/(number accepted); L_u > 0 shows lambda_u
        informative |= 0 < mask.sum() < MU * BATCH and loss_u > 0
        assert loss['graph']
        assert loss['loss'].item() == pytest.approx((loss_s + lambda_u * loss_u).item(), rel=1e-5, abs=1e-6), \
            f'step {step}: L_s {loss_s.item():.6f}, L_u {loss_u.item():.6f}'
    assert informative, 'no step with a partial mask and L_u > 0: the unlabeled term went untested'


def test_unlabeled_loss_by_hand():
    """L_u = 1/(mu B) sum_b mask_b CE(f(strong(u_b)), pseudo_b): the sum is divided by all rows, accepted or not."""
    ln3 = math.log(3)
    logits = torch.tensor([[0.0, ln3], [0.0, ln3], [0.0, 0.0], [ln3, 0.0]], requires_grad=True)  # softmax 1/4, 3/4
    pseudo, mask = torch.tensor([1, 0, 0, 0]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    loss = unlabeled_loss(logits, pseudo, mask)
    # CE: -log 3/4, -log 1/4, (ln 2, masked out), -log 3/4; divided by 4 rows, not by the 3 accepted
    assert loss.item() == pytest.approx((2 * math.log(4 / 3) + math.log(4)) / 4, rel=1e-6)
    loss.backward()
    # d/dz CE = softmax - onehot, times mask_b / 4: the rejected row gets no gradient
    expected = torch.tensor([[0.25, -0.25], [-0.75, 0.75], [0.0, 0.0], [-0.25, 0.25]]) / 4
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    assert unlabeled_loss(logits.detach(), pseudo, torch.zeros(4)).item() == 0.0
    assert unlabeled_loss(logits.detach().bfloat16(), pseudo, mask).dtype == torch.float32  # computed in float32


# -----------------------------------------------------------------------------
# pseudo-label quality: counted from the step's own pseudo-labels, never trained on

def test_pseudo_label_quality_is_counted_by_hand(faces, tmp_path):
    """With --pool-labels, each train record holds per class c, over its interval: pseudo-labels made (predicted),
    accepted, made with a known true label (labeled), accepted with one (accepted_labeled), accepted and right
    (accepted_correct), right (correct); precision = accepted_correct / accepted_labeled, recall = accepted_correct /
    correct. Recounted here from the recorded pseudo-labels, mask and pool indices, with true labels written by this
    test: some in another spelling, some of a class the model lacks, some files left out. Without the labels file
    the log has none of these counts and the run is the same, step for step."""
    from sources.faces import CLASSES
    pool = os.path.join(faces, 'unlabeled')
    files = sorted((os.path.relpath(os.path.join(d, f), pool) for d, _, fs in os.walk(pool) for f in fs
                    if f.endswith(('.png', '.jpg'))), key=lambda path: path.split(os.sep))  # the pool's order
    names, lines = [], ['image,emotion']
    for i, path in enumerate(files):
        k = i % (len(CLASSES) + 2)
        if k < len(CLASSES):
            names.append(CLASSES[k])
            lines.append(f'{os.path.basename(path)},{CLASSES[k].upper() if i % 2 else CLASSES[k]}')
        else:  # a class the model does not have, or no line at all: unknown
            names.append(None)
            lines += [f'{os.path.basename(path)},contempt'] if k == len(CLASSES) else []
    (tmp_path / 'labels.csv').write_text('\n'.join(lines) + '\n')
    # --dtm-momentum 0 --dtm-min 0: T(c) is the batch's mean confidence in c, so some right labels are rejected
    flags = ('--steps', str(RECORDED), '--log-every', '1', '--mu', '8', '--dtm-min', '0', '--dtm-momentum', '0')

    def run(name, *extra):
        result = subprocess.run([sys.executable, '-c', HOOK, *tiny(faces, tmp_path / name, *flags, *extra)],
                                cwd=tmp_path, env=dict(ENV, RECORD=str(tmp_path / f'{name}.pt')), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        log = [json.loads(line) for line in (tmp_path / name / 'log.jsonl').read_text().splitlines()]
        return load(tmp_path / f'{name}.pt'), log[0]['classes'], [r for r in log if r['event'] == 'train']
    with ThreadPoolExecutor(2) as executor:
        (record, classes, log), (_, _, plain) = executor.map(lambda a: run(*a), [
            ('labels', '--pool-labels', str(tmp_path / 'labels.csv')), ('plain',)])
    truth = torch.tensor([classes.index(name) if name else -1 for name in names])  # in the model's class order
    assert [r['step'] for r in log] == list(range(1, RECORDED + 1))
    totals = dict(accepted_correct=0, accepted_labeled=0, correct=0, unknown=0)
    for threshold, logged in zip(record['thresholds'], log):
        pseudo, mask, index = threshold['pseudo'], threshold['mask'].bool(), threshold['index']
        true = truth[index]
        known, right = true >= 0, true == pseudo

        def per_class(chosen):
            return [int((chosen & (pseudo == c)).sum()) for c in range(len(classes))]
        expected = dict(predicted=per_class(torch.ones_like(mask)), accepted=per_class(mask), labeled=per_class(known),
                        accepted_labeled=per_class(mask & known), accepted_correct=per_class(mask & right),
                        correct=per_class(right))
        for key, counts in expected.items():
            assert logged[key] == counts, f'step {logged["step"]}: {key}'
        for key in ('accepted_correct', 'accepted_labeled', 'correct'):
            totals[key] += sum(expected[key])
        totals['unknown'] += int((~known).sum())
    # every count is informative: precision and recall are neither 0/0 nor trivially 1, and unknown labels occur
    assert 0 < totals['accepted_correct'] < totals['accepted_labeled'], totals
    assert totals['accepted_correct'] < totals['correct'] and totals['unknown'] > 0, totals
    keys = ('labeled', 'accepted_labeled', 'accepted_correct', 'correct')
    assert not any(k in r for r in plain for k in keys), 'a pool without labels logged quality counts'
    for a, b in zip(log, plain):
        assert (a['loss_s'], a['loss_u'], a['predicted'], a['accepted']) == \
            (b['loss_s'], b['loss_u'], b['predicted'], b['accepted']), 'the labels changed the run'
    assert_identical(load(tmp_path / 'labels' / 'last.pt')['model'], load(tmp_path / 'plain' / 'last.pt')['model'],
                     'model')


# -----------------------------------------------------------------------------
# the weight EMA

def test_ema_by_hand(recorded):
    record = recorded['concat']
    initial, weights, saved = record['initial'], record['weights'], record['checkpoint']['ema_model']
    assert len(weights) == STEPS and saved.keys() == initial.keys()
    decays = [min(EMA, (1 + k) / (10 + k)) for k in range(1, STEPS + 1)]
    assert decays[0] < EMA == decays[-1], 'both regimes of the min must show'

    def follow(decays, keys):
        """e_k = d_k e_{k-1} + (1 - d_k) w_k from e_0 = the initial weights."""
        ema = {k: initial[k].clone() for k in keys}
        for d, w in zip(decays, weights):
            for k, e in ema.items():
                e.mul_(d).add_(w[k], alpha=1 - d)
        return ema
    ema = follow(decays, [k for k, v in initial.items() if v.is_floating_point()])  # BN statistics included
    for key, value in saved.items():
        if value.is_floating_point():
            assert torch.allclose(value, ema[key], rtol=1e-5, atol=1e-6), key
        else:
            assert torch.equal(value, weights[-1][key]), key  # BN's num_batches_tracked: copied
    # a decay without the warm-up must be told apart at this tolerance
    keys = ('conv1.weight', 'bn1.running_mean', 'fc.weight')
    constant = follow([EMA] * STEPS, keys)
    assert any(not torch.allclose(constant[k], ema[k], rtol=1e-5, atol=1e-6) for k in keys)


# -----------------------------------------------------------------------------
# every threshold policy, straight and resumed

POLICIES = {'dtm': (), 'fixed': ('--threshold', 'fixed'), 'flexmatch': ('--threshold', 'flexmatch'),
            'freematch': ('--threshold', 'freematch'), 'none': ('--threshold', 'none'),
            'dtm_balanced': ('--balanced',), 'dtm_ema_teacher': ('--teacher', 'ema')}
# --tau 0.3: the fixed and FlexMatch thresholds accept some of the untrained model's pseudo-labels. --lr-warmup 1: the
# weights move enough in STEPS steps for the EMA teacher to accept some too; lambda_u is still ramping up at the end
POLICY_FLAGS = ('--steps', str(STEPS), '--tau', '0.3', '--dtm-min', '0.2', '--lr-warmup', '1')


def drive(tmp, name, commands):
    (tmp / f'{name}.json').write_text(json.dumps(commands))
    result = subprocess.run([sys.executable, '-c', DRIVER, str(tmp / f'{name}.json')], cwd=tmp, capture_output=True,
                            text=True, timeout=600, env=dict(ENV, RESULTS=str(tmp / f'{name}.results.json')))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((tmp / f'{name}.results.json').read_text())


@pytest.fixture(scope='module')
def policies(faces, tmp_path_factory):
    """Each policy runs STEPS steps straight (saving at STEPS/2 too), then, in a fresh process, from its STEPS/2
    checkpoint to STEPS."""
    tmp = tmp_path_factory.mktemp('policies')
    half = STEPS // 2
    straight = drive(tmp, 'straight', {name: tiny(faces, tmp / 'straight' / name, *POLICY_FLAGS, *flags,
                                                  '--save-every', str(half)) for name, flags in POLICIES.items()})
    resumed = drive(tmp, 'resumed', {
        name: tiny(faces, tmp / 'resumed' / name, *POLICY_FLAGS, *flags, '--resume',
                   str(tmp / 'straight' / name / f'last.{half}.pt'))
        for name, flags in POLICIES.items() if os.path.exists(tmp / 'straight' / name / f'last.{half}.pt')})
    return tmp, straight, resumed


@pytest.mark.parametrize('policy', POLICIES)
def test_policy_trains_and_resumes_exactly(policies, policy):
    tmp, straight, resumed = policies
    assert straight[policy] == 'ok', straight[policy]
    assert resumed[policy] == 'ok', resumed[policy]
    half, end = load(tmp / 'straight' / policy / f'last.{STEPS // 2}.pt'), load(tmp / 'straight' / policy / 'last.pt')
    again = load(tmp / 'resumed' / policy / 'last.pt')
    assert half['step'] == STEPS // 2 and end['step'] == again['step'] == STEPS
    assert end['config']['threshold'] == (POLICIES[policy][1] if POLICIES[policy][:1] == ('--threshold',) else 'dtm')
    assert not torch.equal(half['model']['fc.weight'], end['model']['fc.weight']), 'the second half did not train'
    for part in ('model', 'ema_model', 'threshold', 'optimizer', 'scheduler'):
        assert_identical(end[part], again[part], part)
    records = [json.loads(line) for line in (tmp / 'straight' / policy / 'log.jsonl').read_text().splitlines()]
    assert records[-1]['event'] == 'end' and records[-1]['step'] == STEPS
    learned = {'dtm': 'kappa', 'flexmatch': 'beta', 'freematch': 'p_model'}.get(end['config']['threshold'])
    if learned:  # the resumed state is one that moves
        assert not torch.equal(half['threshold'][learned], end['threshold'][learned]), f'{learned} never updated'
    if policy != 'none':
        assert sum(sum(r['accepted']) for r in records if r['event'] == 'train') > 0, 'no pseudo-label accepted'


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no GPU')
def test_teacher_forward_replayed_as_a_cuda_graph_is_the_forward():
    """train.py replays the teacher's no-grad forward as a CUDA graph on one GPU: with the weights changing between
    steps (in place, as the optimizer changes them), each call gives the probabilities of the plain forward and moves
    the batch norm running statistics as it does."""
    from fast.cuda_graphs import CudaGraphs
    torch.manual_seed(0)
    graphed_model = build_model('resnet18', 7).cuda().to(memory_format=torch.channels_last)
    plain_model = build_model('resnet18', 7).cuda().to(memory_format=torch.channels_last)
    plain_model.load_state_dict(graphed_model.state_dict())

    def forward(net):
        @torch.no_grad()
        def probabilities(u_weak):
            with torch.autocast('cuda', torch.bfloat16, cache_enabled=False):
                return net(u_weak).float().softmax(dim=1)
        return probabilities
    graphed = CudaGraphs(forward(graphed_model))
    for step in range(4):
        u_weak = torch.randn(24, 3, 48, 48, device='cuda').contiguous(memory_format=torch.channels_last)
        got, expected = graphed(u_weak).clone(), forward(plain_model)(u_weak)
        assert torch.allclose(got, expected, atol=2e-3), step
        for net in (graphed_model, plain_model):  # an optimizer step: in place
            with torch.no_grad():
                for p in net.parameters():
                    p.mul_(0.9).add_(0.01)
    for a, b in zip(graphed_model.buffers(), plain_model.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    assert graphed_model.bn1.num_batches_tracked.item() == 4
    assert all(graph is not None for graph in graphed.graphs.values())
