"""
Tests of dtm.py: every threshold policy against values computed by hand from the equations in dtm.py
(the arithmetic is written out in the comments), and the distributed synchronisation with two CPU processes.

    python -m pytest test_dtm.py
"""
import ast
import datetime
import os
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtm import DynamicThreshold, FixedThreshold


def P(*rows):
    """A batch of probability rows written out by hand (each row sums to 1)."""
    probs = torch.tensor(rows, dtype=torch.float32)
    assert torch.allclose(probs.sum(1), torch.ones(len(rows))), 'a test batch row does not sum to 1'
    return probs


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double().cpu(), expected, atol=atol, rtol=0), f'{actual.tolist()} != {expected.tolist()}'


def test_dtm_imports_only_torch():
    """dtm.py is the file people copy into their projects: it must need nothing but torch."""
    tree = ast.parse((pathlib.Path(__file__).parent / 'dtm.py').read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, 'dtm.py must not import from its own package'
            modules.add(node.module.split('.')[0])
    assert modules == {'torch'}, modules


# -----------------------------------------------------------------------------
# DTM: kappa(c) <- m kappa(c) + (1 - m) mean{conf_b : pseudo_b = c};  T(c) = clip(kappa(c), T_min, T_max)

# the batch of the hand computation below (C = 3): class 2 is never predicted
BATCH = P([0.70, 0.20, 0.10],   # pseudo 0, conf 0.70
          [0.45, 0.35, 0.20],   # pseudo 0, conf 0.45
          [0.10, 0.80, 0.10],   # pseudo 1, conf 0.80
          [0.60, 0.30, 0.10])   # pseudo 0, conf 0.60


def test_dtm_initial_state():
    dtm = DynamicThreshold(num_classes=4, momentum=0.9, min_threshold=0.1, max_threshold=0.95)
    close(dtm.kappa, [0.25] * 4)            # kappa starts at 1/C
    close(dtm.threshold(), [0.25] * 4)      # inside [0.1, 0.95]: T = kappa
    dtm = DynamicThreshold(num_classes=4, momentum=0.9, min_threshold=0.5, max_threshold=0.95)
    close(dtm.threshold(), [0.5] * 4)       # 1/4 clipped up to T_min
    assert 'kappa' in dict(dtm.named_buffers())


def test_dtm_one_step_by_hand():
    dtm = DynamicThreshold(num_classes=3, momentum=0.5, min_threshold=0.4, max_threshold=0.95)
    pseudo, mask = dtm(BATCH)
    assert pseudo.tolist() == [0, 0, 1, 0]
    # class 0: mean conf = (0.70 + 0.45 + 0.60) / 3 = 0.583333;  kappa = 0.5 * 1/3 + 0.5 * 0.583333 = 0.458333
    # class 1: mean conf = 0.80;                                  kappa = 0.5 * 1/3 + 0.5 * 0.80     = 0.566667
    # class 2: absent from the batch, keeps kappa = 1/3
    close(dtm.kappa, [0.5 / 3 + 0.5 * 1.75 / 3, 0.5 / 3 + 0.4, 1 / 3])
    # T = clip(kappa, 0.4, 0.95) = [0.458333, 0.566667, 0.4]
    close(dtm.threshold(), [0.5 / 3 + 0.5 * 1.75 / 3, 0.5 / 3 + 0.4, 0.4])
    # the mask uses the thresholds *after* this batch's update: 0.45 < 0.458333 is rejected, the rest pass
    assert mask.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert mask.dtype == torch.float32 and pseudo.dtype == torch.long


def test_dtm_relative_by_hand():
    """relative=True: T(c) = clip(T_max * kappa(c) / max kappa, T_min, T_max) on the same batch as above."""
    dtm = DynamicThreshold(num_classes=3, momentum=0.5, min_threshold=0.4, max_threshold=0.95, relative=True)
    close(dtm.threshold(), [0.95] * 3)  # all kappa equal at 1/C: every class is the surest one
    pseudo, mask = dtm(BATCH)
    kappa = torch.tensor([0.5 / 3 + 0.5 * 1.75 / 3, 0.5 / 3 + 0.4, 1 / 3])  # as the plain DTM's: 0.458, 0.567, 0.333
    close(dtm.kappa, kappa)
    # T = clip(0.95 * kappa / 0.566667, 0.4, 0.95) = [0.768382, 0.95, 0.558824]
    close(dtm.threshold(), [0.95 * 0.458333 / 0.566667, 0.95, 0.95 / 3 / 0.566667])
    # class 0 confidences 0.70, 0.45, 0.60 all under 0.768; class 1's 0.80 under 0.95: nothing passes
    assert mask.tolist() == [0.0, 0.0, 0.0, 0.0]
    # next batch: kappa(1) = 0.5 * 0.566667 + 0.5 * 0.9 = 0.733333, kappa(2) = 0.5 / 3 + 0.5 * 0.7 = 0.516667, so
    # T(1) = 0.95 rejects the surest class at 0.9, while T(2) = 0.95 * 0.516667 / 0.733333 = 0.669 accepts 0.7
    _, mask = dtm(torch.tensor([[0.1, 0.9, 0.0], [0.1, 0.2, 0.7]]))
    assert mask.tolist() == [0.0, 1.0]


def test_dtm_two_steps_by_hand():
    dtm = DynamicThreshold(num_classes=3, momentum=0.9, min_threshold=0.05, max_threshold=0.95)
    dtm(BATCH)
    # step 1: kappa = [0.9/3 + 0.1 * 0.583333, 0.9/3 + 0.1 * 0.8, 1/3] = [0.358333, 0.38, 0.333333]
    close(dtm.kappa, [0.3 + 0.1 * 1.75 / 3, 0.38, 1 / 3])
    dtm(P([0.20, 0.10, 0.70],    # pseudo 2, conf 0.7
          [0.05, 0.05, 0.90],    # pseudo 2, conf 0.9
          [0.10, 0.60, 0.30]))   # pseudo 1, conf 0.6
    # step 2: class 0 absent, keeps 0.358333; class 1: 0.9 * 0.38 + 0.1 * 0.6 = 0.402;
    #         class 2: 0.9 * 1/3 + 0.1 * 0.8 = 0.38
    close(dtm.kappa, [0.3 + 0.1 * 1.75 / 3, 0.402, 0.38])


def test_dtm_converges_geometrically():
    """Feeding a constant confidence x for class c: kappa_n = x + (kappa_0 - x) m^n (closed form of the EMA)."""
    m, x, n = 0.8, 0.9, 25
    dtm = DynamicThreshold(num_classes=2, momentum=m, min_threshold=0.0, max_threshold=1.0)
    for _ in range(n):
        dtm(P([x, 1 - x], [x, 1 - x]))
    close(dtm.kappa, [x + (0.5 - x) * m ** n, 0.5], atol=1e-5)


def test_dtm_clipping():
    # momentum 0: kappa = this batch's mean, so the clip is visible in one step
    dtm = DynamicThreshold(num_classes=3, momentum=0.0, min_threshold=0.5, max_threshold=0.9)
    pseudo, mask = dtm(P([0.98, 0.01, 0.01],    # pseudo 0, conf 0.98
                         [0.30, 0.40, 0.30],    # pseudo 1, conf 0.40
                         [0.20, 0.20, 0.60]))   # pseudo 2, conf 0.60
    close(dtm.kappa, [0.98, 0.40, 0.60])        # kappa itself is not clipped
    close(dtm.threshold(), [0.90, 0.50, 0.60])  # T_max above, T_min below, inside untouched
    assert mask.tolist() == [1.0, 0.0, 1.0]     # 0.40 < T_min = 0.5


def test_mask_boundary_is_inclusive():
    """mask_b = [conf_b >= T(pseudo_b)]: a confidence exactly at the threshold is accepted, one ulp below is not."""
    dtm = DynamicThreshold(num_classes=2, momentum=0.9, min_threshold=0.5, max_threshold=0.95).eval()
    dtm.kappa.copy_(torch.tensor([0.625, 0.75]))  # exact in binary
    below = torch.nextafter(torch.tensor(0.625), torch.tensor(0.0)).item()
    pseudo, mask = dtm(P([0.625, 0.375], [below, 1 - below], [0.25, 0.75], [0.5, 0.5]))
    # the last row is a tie: argmax takes class 0, conf 0.5 < 0.625
    assert pseudo.tolist() == [0, 0, 1, 0]
    assert mask.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_dtm_eval_mode_does_not_update():
    dtm = DynamicThreshold(num_classes=3, momentum=0.5, min_threshold=0.4, max_threshold=0.95)
    dtm.eval()
    pseudo, mask = dtm(BATCH)
    close(dtm.kappa, [1 / 3] * 3)
    assert mask.tolist() == [1.0, 1.0, 1.0, 1.0]  # T = clip(1/3) = 0.4 everywhere
    dtm.train()
    dtm(BATCH)
    assert not torch.allclose(dtm.kappa, torch.full((3,), 1 / 3))


def test_dtm_ignores_gradients_and_dtype():
    """probs carrying autograd history or in float64 / bfloat16 update kappa the same way."""
    reference = DynamicThreshold(3, 0.5, 0.4, 0.95)
    reference(BATCH)
    for probs in (BATCH.clone().requires_grad_(), BATCH.double(), BATCH.bfloat16()):
        dtm = DynamicThreshold(3, 0.5, 0.4, 0.95)
        pseudo, mask = dtm(probs)
        assert not mask.requires_grad
        close(dtm.kappa, reference.kappa, atol=5e-3 if probs.dtype == torch.bfloat16 else 1e-6)


def test_dtm_state_round_trip(tmp_path):
    dtm = DynamicThreshold(num_classes=3, momentum=0.5, min_threshold=0.4, max_threshold=0.95)
    dtm(BATCH)
    dtm(P([0.2, 0.1, 0.7], [0.1, 0.2, 0.7]))
    torch.save(dtm.state_dict(), tmp_path / 'dtm.pt')
    restored = DynamicThreshold(num_classes=3, momentum=0.5, min_threshold=0.4, max_threshold=0.95)
    restored.load_state_dict(torch.load(tmp_path / 'dtm.pt', weights_only=True))
    assert torch.equal(restored.kappa, dtm.kappa) and torch.equal(restored.threshold(), dtm.threshold())
    # and they go on identically
    batch = P([0.5, 0.3, 0.2], [0.3, 0.3, 0.4], [0.1, 0.85, 0.05])
    assert [t.tolist() for t in dtm(batch)] == [t.tolist() for t in restored(batch)]
    assert torch.equal(restored.kappa, dtm.kappa)


@pytest.mark.parametrize('make', [lambda: DynamicThreshold(3), lambda: FixedThreshold(3)])
def test_buffers_move_with_to(make):
    policy = make()
    policy.to('meta')  # a device move without a GPU: every piece of state must follow
    for name, tensor in [*policy.named_buffers(), *policy.named_parameters()]:
        assert tensor.device.type == 'meta', name
    policy = make().to(torch.float64)
    for name, tensor in policy.named_buffers():
        assert tensor.dtype == torch.float64, (name, tensor.dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_policies_on_cuda():
    """The whole update runs on the device of the buffers (no CPU tensors created in update)."""
    index = torch.tensor([0, 1, 2, 3])
    for make in (lambda: DynamicThreshold(3, 0.5, 0.4, 0.95), lambda: FixedThreshold(3)):
        cpu, gpu = make(), make().cuda()
        expected = cpu(BATCH, index)
        got = gpu(BATCH.cuda(), index.cuda())
        assert [t.tolist() for t in expected] == [t.cpu().tolist() for t in got]
        for (name, a), (_, b) in zip(cpu.named_buffers(), gpu.named_buffers()):
            assert b.is_cuda and torch.allclose(a.double(), b.cpu().double(), atol=1e-6), name


# -----------------------------------------------------------------------------
# FixMatch: T(c) = 0.95


def test_fixed_threshold():
    fixed = FixedThreshold(num_classes=3)
    close(fixed.threshold(), [0.95] * 3)
    pseudo, mask = fixed(P([0.95, 0.03, 0.02], [0.02, 0.03, 0.95], [0.9, 0.05, 0.05], [0.01, 0.98, 0.01]))
    assert pseudo.tolist() == [0, 2, 0, 1]
    assert mask.tolist() == [1.0, 1.0, 0.0, 1.0]  # 0.95 >= 0.95 is accepted
    close(fixed.threshold(), [0.95] * 3)          # nothing learned
    close(FixedThreshold(4, 0.7).threshold(), [0.7] * 4)


# -----------------------------------------------------------------------------
# distributed: two gloo processes, each with its own batch, must end with the state of one process fed the
# union of the two batches (sums and counts all-reduced)

RANK_BATCHES = [
    # rank 0                                       rank 1
    (P([0.70, 0.20, 0.10], [0.50, 0.30, 0.20]), P([0.90, 0.05, 0.05], [0.10, 0.20, 0.70])),
    (P([0.10, 0.80, 0.10], [0.20, 0.20, 0.60]), P([0.97, 0.02, 0.01], [0.01, 0.96, 0.03])),
]


def make_policies():
    return dict(dtm=DynamicThreshold(3, momentum=0.5, min_threshold=0.1, max_threshold=0.95))


def _distributed_worker(rank, world, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        policies = make_policies()
        results = {}
        for name, policy in policies.items():
            masks = []
            for batches in RANK_BATCHES:
                masks.append(policy(batches[rank])[1])
            results[name] = dict(state=policy.state_dict(), threshold=policy.threshold(), masks=masks)
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_distributed_sync_matches_union(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]

    # single process fed the union of the two ranks' batches
    single = make_policies()
    for name, policy in single.items():
        for batches in RANK_BATCHES:
            policy(torch.cat(batches))

    for name in single:
        a, b = ranks[0][name], ranks[1][name]
        for key in a['state']:  # both ranks hold exactly the same state
            assert torch.equal(a['state'][key], b['state'][key]), (name, key)
        for key, value in single[name].state_dict().items():
            close(a['state'][key], value)
        close(a['threshold'], single[name].threshold())

    # and the hand computation of the DTM on the union, m = 0.5, kappa_0 = 1/3:
    # step 1 union: class 0 confs 0.70, 0.50, 0.90 (mean 0.7); class 2 conf 0.70; class 1 absent
    #   kappa = [1/6 + 0.35, 1/3, 1/6 + 0.35] = [0.516667, 0.333333, 0.516667]
    # step 2 union: class 1 confs 0.80, 0.96 (mean 0.88); class 2 0.60; class 0 0.97
    #   kappa = [0.258333 + 0.485, 1/6 + 0.44, 0.258333 + 0.30] = [0.743333, 0.606667, 0.558333]
    close(ranks[0]['dtm']['state']['kappa'], [1 / 12 + 0.175 + 0.485, 1 / 6 + 0.44, 1 / 12 + 0.175 + 0.30])
    # a rank's mask covers its own rows only, with the synchronised thresholds: step 1 T = kappa (inside the clip)
    assert ranks[0]['dtm']['masks'][0].tolist() == [1.0, 0.0]  # 0.50 < 0.516667
    assert ranks[1]['dtm']['masks'][0].tolist() == [1.0, 1.0]  # 0.90, 0.70 >= 0.516667

