"""
Tests of dtm.py: every threshold policy against values computed by hand from the equations in METHOD.md
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

from baselines.thresholds import FlexMatchThreshold, FreeMatchThreshold
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


@pytest.mark.parametrize('make', [lambda: DynamicThreshold(3), lambda: FixedThreshold(3),
                                  lambda: FlexMatchThreshold(3, 10), lambda: FreeMatchThreshold(3)])
def test_buffers_move_with_to(make):
    policy = make()
    policy.to('meta')  # a device move without a GPU: every piece of state must follow
    for name, tensor in [*policy.named_buffers(), *policy.named_parameters()]:
        assert tensor.device.type == 'meta', name
    policy = make().to(torch.float64)
    for name, tensor in policy.named_buffers():
        assert tensor.dtype in (torch.float64, torch.int8, torch.int16, torch.long), (name, tensor.dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_policies_on_cuda():
    """The whole update runs on the device of the buffers (no CPU tensors created in update)."""
    index = torch.tensor([0, 1, 2, 3])
    for make in (lambda: DynamicThreshold(3, 0.5, 0.4, 0.95), lambda: FixedThreshold(3),
                 lambda: FlexMatchThreshold(3, 10), lambda: FreeMatchThreshold(3, 0.9)):
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
# FlexMatch: sigma(c) = #samples whose last conf > tau prediction is c;
# beta(c) = sigma(c) / max(max_c sigma, #never selected);  T(c) = tau beta(c) / (2 - beta(c))


def test_flexmatch_by_hand():
    flex = FlexMatchThreshold(num_classes=3, num_samples=6)  # tau = 0.95
    # nothing selected yet: sigma = 0, beta = 0, T = 0 (every pseudo-label passes, FlexMatch's warm-up)
    close(flex.threshold(), [0, 0, 0])
    pseudo, mask = flex(P([0.97, 0.02, 0.01],    # sample 0: class 0, 0.97 > 0.95 -> memory 0
                          [0.96, 0.02, 0.02],    # sample 1: class 0, 0.96        -> memory 0
                          [0.005, 0.99, 0.005],  # sample 2: class 1, 0.99        -> memory 1
                          [0.05, 0.05, 0.90],    # sample 3: class 2, 0.90 <= tau -> stays unselected
                          [0.40, 0.35, 0.25]),   # sample 4: class 0, 0.40        -> stays unselected
                        torch.tensor([0, 1, 2, 3, 4]))
    assert flex.selected.tolist() == [0, 0, 1, 3, 3, 3]  # 3 = C = never selected
    # sigma = [2, 1, 0], unselected = 3, so the normaliser is max(2, 3) = 3; beta = [2/3, 1/3, 0]
    # T = 0.95 * [(2/3)/(4/3), (1/3)/(5/3), 0] = [0.475, 0.19, 0]
    assert flex.sigma.tolist() == [2, 1, 0, 3]
    close(flex.threshold(), [0.475, 0.19, 0.0])
    assert pseudo.tolist() == [0, 0, 1, 2, 0]
    assert mask.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # 0.40 < 0.475

    pseudo, mask = flex(P([0.02, 0.02, 0.96],    # sample 0 moves from class 0 to class 2
                          [0.05, 0.90, 0.05],    # sample 1: class 1 at 0.90 <= tau: memory keeps class 0
                          [0.01, 0.98, 0.01],    # sample 5: class 1
                          [0.01, 0.02, 0.97],    # sample 3: class 2, twice in the batch:
                          [0.01, 0.02, 0.97]),   #           it counts once
                        torch.tensor([0, 1, 5, 3, 3]))
    assert flex.selected.tolist() == [2, 0, 1, 2, 3, 1]
    # sigma = [1, 2, 2], unselected = 1, normaliser max(2, 1) = 2; beta = [1/2, 1, 1]
    # T = 0.95 * [(1/2)/(3/2), 1/1, 1/1] = [0.316667, 0.95, 0.95]
    assert flex.sigma.tolist() == [1, 2, 2, 1]
    close(flex.threshold(), [0.95 / 3, 0.95, 0.95])
    # the memory used the fixed tau, but the mask uses the flexible T: sample 1 (class 1, 0.90 < 0.95) rejected
    assert mask.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]


def test_flexmatch_memory_uses_fixed_tau_strictly():
    """The memory takes predictions with conf > tau; the flexible threshold never enters it."""
    flex = FlexMatchThreshold(num_classes=2, num_samples=3, threshold=0.75)
    flex(P([0.75, 0.25], [0.25, 0.75], [0.0625, 0.9375]), torch.tensor([0, 1, 2]))
    assert flex.selected.tolist() == [2, 2, 1]  # 0.75 is not above tau = 0.75
    assert flex.sigma.tolist() == [0, 1, 2]
    # beta = [0, 1/2]; T = 0.75 * [0, (1/2)/(3/2)] = [0, 0.25]
    close(flex.threshold(), [0.0, 0.25])


def reference_flexmatch(batches, num_classes, num_samples, tau):
    """FlexMatch in plain Python, one sample at a time (the TorchSSL formulation with threshold warm-up)."""
    memory = [None] * num_samples
    for probs, index in batches:
        for row, i in zip(probs.tolist(), index.tolist()):
            conf = max(row)
            if conf > tau:
                memory[i] = row.index(conf)
    sigma = [sum(1 for s in memory if s == c) for c in range(num_classes)]
    unused = sum(1 for s in memory if s is None)
    norm = max(max(sigma), unused)
    beta = [s / norm for s in sigma]
    return memory, sigma, [tau * b / (2 - b) for b in beta]


def test_flexmatch_matches_a_plain_python_reference():
    generator = torch.Generator().manual_seed(0)
    flex = FlexMatchThreshold(num_classes=4, num_samples=50, threshold=0.6)
    batches = []
    for _ in range(30):
        index = torch.randint(0, 50, (12,), generator=generator)
        logits = 3 * torch.randn(12, 4, generator=generator)
        # a sample drawn twice in one batch is given the same prediction (the reference is then unambiguous)
        first = {}
        for k, i in enumerate(index.tolist()):
            logits[k] = logits[first.setdefault(i, k)]
        probs = logits.softmax(dim=1)
        batches.append((probs, index))
        flex(probs, index)
    memory, sigma, T = reference_flexmatch(batches, 4, 50, 0.6)
    assert flex.selected.tolist() == [4 if s is None else s for s in memory]
    assert flex.sigma.tolist() == sigma + [memory.count(None)]
    close(flex.threshold(), T)


def test_flexmatch_conflicting_duplicates_keep_counts_consistent():
    """A sample seen twice in one batch with two different confident predictions: it ends in one class, and
    sigma still counts every sample exactly once."""
    flex = FlexMatchThreshold(num_classes=3, num_samples=4)
    flex(P([0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.01, 0.98]), torch.tensor([2, 2, 0]))
    assert flex.selected[2].item() in (0, 1) and flex.selected[0].item() == 2
    assert flex.sigma.tolist() == torch.bincount(flex.selected.long(), minlength=4).tolist()
    assert flex.sigma.sum().item() == 4


def test_flexmatch_eval_mode_and_state_round_trip():
    flex = FlexMatchThreshold(num_classes=3, num_samples=6)
    flex(P([0.97, 0.02, 0.01], [0.005, 0.99, 0.005]), torch.tensor([0, 5]))
    flex.eval()
    before = {k: v.clone() for k, v in flex.state_dict().items()}
    flex(P([0.01, 0.01, 0.98]), torch.tensor([1]))
    assert all(torch.equal(before[k], v) for k, v in flex.state_dict().items())
    # every piece of state is in the state dict (TorchSSL lost it on resume)
    restored = FlexMatchThreshold(num_classes=3, num_samples=6)
    restored.load_state_dict(flex.state_dict())
    assert torch.equal(restored.selected, flex.selected) and torch.equal(restored.sigma, flex.sigma)
    assert torch.equal(restored.threshold(), flex.threshold())
    close(restored.threshold(), [0.95 * 0.25 / 1.75] * 2 + [0.0])  # sigma [1, 1, 0], 4 unused: beta = 1/4


def test_flexmatch_many_classes_memory_dtype():
    """class C (never selected) must fit the memory's dtype for any C."""
    flex = FlexMatchThreshold(num_classes=200, num_samples=3, threshold=0.5)
    probs = torch.full((1, 200), 0.1 / 199)
    probs[0, 199] = 0.9
    flex(probs, torch.tensor([1]))
    assert flex.selected.tolist() == [200, 199, 200]
    assert flex.sigma[199].item() == 1 and flex.sigma[200].item() == 2


# -----------------------------------------------------------------------------
# FreeMatch: tau_t <- m tau_t + (1 - m) mean_b conf_b;  p(c) <- m p(c) + (1 - m) mean_b q_b(c);
# T(c) = tau_t p(c) / max_c p(c)

FREE_BATCH = P([0.70, 0.20, 0.10],   # pseudo 0, conf 0.70
               [0.10, 0.60, 0.30],   # pseudo 1, conf 0.60
               [0.50, 0.20, 0.30],   # pseudo 0, conf 0.50
               [0.34, 0.33, 0.33])   # pseudo 0, conf 0.34


def test_freematch_by_hand():
    free = FreeMatchThreshold(num_classes=3, momentum=0.9)
    close(free.tau, 1 / 3)
    close(free.p_model, [1 / 3] * 3)
    close(free.threshold(), [1 / 3] * 3)
    pseudo, mask = free(FREE_BATCH)
    # mean conf = (0.70 + 0.60 + 0.50 + 0.34) / 4 = 0.535;  tau = 0.9 / 3 + 0.1 * 0.535 = 0.3535
    close(free.tau, 0.3535)
    # mean q = [1.64, 1.33, 1.03] / 4 = [0.41, 0.3325, 0.2575];  p = 0.3 + 0.1 * mean q = [0.341, 0.33325, 0.32575]
    close(free.p_model, [0.341, 0.33325, 0.32575])
    # T = 0.3535 * p / 0.341 = [0.3535, 0.345466, 0.337691]
    close(free.threshold(), [0.3535, 0.3535 * 0.33325 / 0.341, 0.3535 * 0.32575 / 0.341])
    assert pseudo.tolist() == [0, 1, 0, 0]
    assert mask.tolist() == [1.0, 1.0, 1.0, 0.0]  # 0.34 < 0.3535


def test_freematch_eval_and_round_trip():
    free = FreeMatchThreshold(num_classes=3, momentum=0.9)
    free(FREE_BATCH)
    free.eval()
    free(P([0.98, 0.01, 0.01]))
    close(free.tau, 0.3535)  # unchanged in eval mode
    restored = FreeMatchThreshold(num_classes=3, momentum=0.9)
    restored.load_state_dict(free.state_dict())
    assert torch.equal(restored.tau, free.tau) and torch.equal(restored.p_model, free.p_model)


# -----------------------------------------------------------------------------
# distributed: two gloo processes, each with its own batch, must end with the state of one process fed the
# union of the two batches (sums and counts all-reduced, FlexMatch's memory updates gathered)

RANK_BATCHES = [
    # rank 0                                       rank 1
    (P([0.70, 0.20, 0.10], [0.50, 0.30, 0.20]), P([0.90, 0.05, 0.05], [0.10, 0.20, 0.70])),
    (P([0.10, 0.80, 0.10], [0.20, 0.20, 0.60]), P([0.97, 0.02, 0.01], [0.01, 0.96, 0.03])),
]
RANK_INDICES = [(torch.tensor([0, 1]), torch.tensor([2, 3])), (torch.tensor([4, 5]), torch.tensor([1, 7]))]


def make_policies():
    return dict(dtm=DynamicThreshold(3, momentum=0.5, min_threshold=0.1, max_threshold=0.95),
                flexmatch=FlexMatchThreshold(3, num_samples=8, threshold=0.6),
                freematch=FreeMatchThreshold(3, momentum=0.5))


def _distributed_worker(rank, world, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        policies = make_policies()
        results = {}
        for name, policy in policies.items():
            masks = []
            for batches, indices in zip(RANK_BATCHES, RANK_INDICES):
                masks.append(policy(batches[rank], indices[rank])[1])
            results[name] = dict(state=policy.state_dict(), threshold=policy.threshold(), masks=masks)
        torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    finally:
        dist.destroy_process_group()


def test_distributed_sync_matches_union(tmp_path):
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]

    # single process fed the union of the two ranks' batches (rank 0's rows first, as all_gather orders them)
    single = make_policies()
    for name, policy in single.items():
        for batches, indices in zip(RANK_BATCHES, RANK_INDICES):
            policy(torch.cat(batches), torch.cat(indices))

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

    # FlexMatch on the union, tau = 0.6: step 1 selects sample 0 -> 0, 2 -> 0, 3 -> 2 (sample 1: 0.50 <= 0.6)
    # step 2 selects 4 -> 1, 5 -> 2 (0.60 is not > 0.6, so 5 stays unselected), 1 -> 0, 7 -> 1
    # memory [0, 0, 0, 2, 1, -, -, 1]: sigma = [3, 2, 1], unused 2; beta = [1, 2/3, 1/3]
    # T = 0.6 * [1, (2/3)/(4/3), (1/3)/(5/3)] = [0.6, 0.3, 0.12]
    assert ranks[1]['flexmatch']['state']['selected'].tolist() == [0, 0, 0, 2, 1, 3, 3, 1]
    close(ranks[1]['flexmatch']['threshold'], [0.6, 0.3, 0.12])

    # FreeMatch on the union, m = 0.5: step 1 mean conf = (0.7 + 0.5 + 0.9 + 0.7) / 4 = 0.7, tau = 1/6 + 0.35
    # step 2 mean conf = (0.8 + 0.6 + 0.97 + 0.96) / 4 = 0.8325, tau = 0.5 * 0.516667 + 0.41625 = 0.674583
    close(ranks[1]['freematch']['state']['tau'], 0.5 * (1 / 6 + 0.35) + 0.5 * 0.8325)
    # p after step 1: mean q = [2.2, 0.75, 1.05] / 4;  p = 1/6 + 0.5 * mean q
    # step 2: mean q = [1.28, 1.98, 0.74] / 4;  p = 0.5 p + 0.5 * mean q
    p1 = [1 / 6 + 0.5 * s / 4 for s in (2.2, 0.75, 1.05)]
    p2 = [0.5 * a + 0.5 * s / 4 for a, s in zip(p1, (1.28, 1.98, 0.74))]
    close(ranks[0]['freematch']['state']['p_model'], p2)
