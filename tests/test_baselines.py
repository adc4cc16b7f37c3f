"""
Tests of baselines/thresholds.py: FlexMatch and FreeMatch run side by side with a transcription of USB's code
(github.com/microsoft/Semi-supervised-learning: FlexMatchThresholdingHook in semilearn/algorithms/flexmatch/utils.py,
FreeMatchThresholdingHook in semilearn/algorithms/freematch/utils.py, entropy_loss and the train_step that calls it in
semilearn/algorithms/freematch/freematch.py), values computed by hand (the arithmetic is written out in the comments),
and the distributed synchronisation with two CPU processes.

    python -m pytest tests/test_baselines.py
"""
import datetime
import math
import os
from collections import Counter
from copy import deepcopy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from baselines.thresholds import FlexMatchThreshold, FreeMatchThreshold, fairness_loss


def P(*rows):
    """A batch of probability rows written out by hand (each row sums to 1)."""
    probs = torch.tensor(rows, dtype=torch.float32)
    assert torch.allclose(probs.sum(1), torch.ones(len(rows))), 'a test batch row does not sum to 1'
    return probs


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double().cpu(), expected, atol=atol, rtol=0), \
        f'{actual.tolist()} != {expected.tolist()}'


# -----------------------------------------------------------------------------
# USB's hooks, transcribed line by line. The differences are only in the plumbing: `algorithm.p_cutoff`,
# `algorithm.use_quantile` (False in every published config) and `algorithm.clip_thresh` become arguments, the
# probabilities come in directly (masking(..., softmax_x_ulb=False)), and there is one process.

class UsbFlexMatch:
    def __init__(self, ulb_dest_len, num_classes, p_cutoff, thresh_warmup=True):
        self.p_cutoff = p_cutoff
        self.ulb_dest_len = ulb_dest_len
        self.num_classes = num_classes
        self.thresh_warmup = thresh_warmup
        self.selected_label = torch.ones((self.ulb_dest_len,), dtype=torch.long, ) * -1
        self.classwise_acc = torch.zeros((self.num_classes,))

    @torch.no_grad()
    def update(self):
        pseudo_counter = Counter(self.selected_label.tolist())
        if max(pseudo_counter.values()) < self.ulb_dest_len:  # not all(5w) -1
            if self.thresh_warmup:
                for i in range(self.num_classes):
                    self.classwise_acc[i] = pseudo_counter[i] / max(pseudo_counter.values())
            else:
                wo_negative_one = deepcopy(pseudo_counter)
                if -1 in wo_negative_one.keys():
                    wo_negative_one.pop(-1)
                for i in range(self.num_classes):
                    self.classwise_acc[i] = pseudo_counter[i] / max(wo_negative_one.values())

    @torch.no_grad()
    def masking(self, probs_x_ulb, idx_ulb):
        max_probs, max_idx = torch.max(probs_x_ulb, dim=-1)
        mask = max_probs.ge(self.p_cutoff * (self.classwise_acc[max_idx] / (2. - self.classwise_acc[max_idx])))
        select = max_probs.ge(self.p_cutoff)
        mask = mask.to(max_probs.dtype)

        # update
        if idx_ulb[select == 1].nelement() != 0:
            self.selected_label[idx_ulb[select == 1]] = max_idx[select == 1]
        self.update()

        return mask


class UsbFreeMatch:
    def __init__(self, num_classes, momentum=0.999, clip_thresh=False):
        self.clip_thresh = clip_thresh
        self.num_classes = num_classes
        self.m = momentum

        self.p_model = torch.ones((self.num_classes)) / self.num_classes
        self.label_hist = torch.ones((self.num_classes)) / self.num_classes
        self.time_p = self.p_model.mean()

    @torch.no_grad()
    def update(self, probs_x_ulb):
        max_probs, max_idx = torch.max(probs_x_ulb, dim=-1, keepdim=True)

        self.time_p = self.time_p * self.m + (1 - self.m) * max_probs.mean()

        if self.clip_thresh:
            self.time_p = torch.clip(self.time_p, 0.0, 0.95)

        self.p_model = self.p_model * self.m + (1 - self.m) * probs_x_ulb.mean(dim=0)
        hist = torch.bincount(max_idx.reshape(-1), minlength=self.p_model.shape[0]).to(self.p_model.dtype)
        self.label_hist = self.label_hist * self.m + (1 - self.m) * (hist / hist.sum())

    @torch.no_grad()
    def masking(self, probs_x_ulb):
        self.update(probs_x_ulb)

        max_probs, max_idx = probs_x_ulb.max(dim=-1)
        mod = self.p_model / torch.max(self.p_model, dim=-1)[0]
        mask = max_probs.ge(self.time_p * mod[max_idx]).to(max_probs.dtype)
        return mask


def replace_inf_to_zero(val):
    val[val == float('inf')] = 0.0
    return val


def entropy_loss(mask, logits_s, prob_model, label_hist):
    mask = mask.bool()

    # select samples
    logits_s = logits_s[mask]

    prob_s = logits_s.softmax(dim=-1)
    _, pred_label_s = torch.max(prob_s, dim=-1)

    hist_s = torch.bincount(pred_label_s, minlength=logits_s.shape[1]).to(logits_s.dtype)
    hist_s = hist_s / hist_s.sum()

    # modulate prob model
    prob_model = prob_model.reshape(1, -1)
    label_hist = label_hist.reshape(1, -1)
    prob_model_scaler = replace_inf_to_zero(1 / label_hist).detach()
    mod_prob_model = prob_model * prob_model_scaler
    mod_prob_model = mod_prob_model / mod_prob_model.sum(dim=-1, keepdim=True)

    # modulate mean prob
    mean_prob_scaler_s = replace_inf_to_zero(1 / hist_s).detach()
    mod_mean_prob_s = prob_s.mean(dim=0, keepdim=True) * mean_prob_scaler_s
    mod_mean_prob_s = mod_mean_prob_s / mod_mean_prob_s.sum(dim=-1, keepdim=True)

    loss = mod_prob_model * torch.log(mod_mean_prob_s + 1e-12)
    loss = loss.sum(dim=1)
    return loss.mean(), hist_s.mean()


def usb_fairness(mask, logits_x_ulb_s, p_model, label_hist):
    """FreeMatch.train_step's use of entropy_loss."""
    if mask.sum() > 0:
        ent_loss, _ = entropy_loss(mask, logits_x_ulb_s, p_model, label_hist)
    else:
        ent_loss = 0.0
    return ent_loss


# -----------------------------------------------------------------------------
# side by side with USB on random batches: identical masks and states at every step

def random_probs(generator, batch, num_classes, bias=0.0):
    """Predictions from flat to near one-hot; bias favours class 0."""
    sharpness = 12 * torch.rand(batch, 1, generator=generator)
    logits = sharpness * torch.randn(batch, num_classes, generator=generator)
    logits[:, 0] += bias
    return logits.softmax(dim=1)


def set_row(probs, row, cls, value):
    """Make probs[row] put exactly `value` (> 1/2) on class cls and spread the rest evenly."""
    probs[row] = (1 - value) / (probs.shape[1] - 1)
    probs[row, cls] = value


@pytest.mark.parametrize('num_classes, num_samples, tau, warmup, bias', [
    (4, 30, 0.75, True, 0.0), (10, 200, 0.95, False, 0.0), (3, 12, 0.75, True, 6.0), (3, 12, 0.75, False, 6.0)])
def test_flexmatch_matches_usb_step_by_step(num_classes, num_samples, tau, warmup, bias):
    generator = torch.Generator().manual_seed(num_classes * 1000 + num_samples + int(warmup))
    ours = FlexMatchThreshold(num_classes, num_samples, threshold=tau, warmup=warmup)
    usb = UsbFlexMatch(num_samples, num_classes, p_cutoff=tau, thresh_warmup=warmup)
    at_threshold, held = 0, 0
    for step in range(300):
        index = torch.randint(0, num_samples, (16,), generator=generator)  # repeats within a batch are common
        probs = random_probs(generator, 16, num_classes, bias)
        set_row(probs, 0, step % num_classes, tau)  # exactly at tau: the memory takes conf >= tau
        usb_threshold = usb.p_cutoff * (usb.classwise_acc / (2. - usb.classwise_acc))
        cls = int(torch.randint(0, num_classes, (), generator=generator))
        if usb_threshold[cls] > 0.5:  # exactly at this step's T(c): the mask takes conf >= T(c)
            set_row(probs, 1, cls, usb_threshold[cls].item())
            at_threshold += 1
        expected_mask = usb.masking(probs, index)
        pseudo, mask = ours(probs, index)
        assert torch.equal(pseudo, probs.argmax(dim=1))
        assert torch.equal(mask, expected_mask), step
        assert torch.equal(ours.selected.long(), usb.selected_label), step
        assert torch.equal(ours.beta, usb.classwise_acc), step
        assert torch.equal(ours.threshold(), usb.p_cutoff * (usb.classwise_acc / (2. - usb.classwise_acc))), step
        counts = Counter(usb.selected_label.tolist())
        held += max(counts.values()) == num_samples and -1 not in counts
    assert at_threshold > 0
    if bias:  # the memory was filled by class 0 alone at some step: beta was held, not recomputed
        assert held > 0


@pytest.mark.parametrize('num_classes, momentum, clip', [(10, 0.999, False), (4, 0.9, False), (4, 0.9, True)])
def test_freematch_matches_usb_step_by_step(num_classes, momentum, clip):
    generator = torch.Generator().manual_seed(num_classes + int(clip))
    ours = FreeMatchThreshold(num_classes, momentum=momentum, clip=clip)
    usb = UsbFreeMatch(num_classes, momentum=momentum, clip_thresh=clip)
    assert torch.equal(ours.tau, usb.time_p) and torch.equal(ours.p_model, usb.p_model)
    assert torch.equal(ours.label_hist, usb.label_hist)
    clipped = 0
    for step in range(300):
        probs = random_probs(generator, 16, num_classes, bias=3.0 if step > 150 else 0.0)
        if clip and step > 150:  # near one-hot predictions push tau_t past 0.95
            probs = (probs.log() * 20).softmax(dim=1)
        expected_mask = usb.masking(probs)
        pseudo, mask = ours(probs)
        assert torch.equal(pseudo, probs.argmax(dim=1))
        assert torch.equal(mask, expected_mask), step
        assert torch.equal(ours.tau, usb.time_p), step
        assert torch.equal(ours.p_model, usb.p_model), step
        assert torch.equal(ours.label_hist, usb.label_hist), step
        assert torch.equal(ours.threshold(), usb.time_p * (usb.p_model / torch.max(usb.p_model, dim=-1)[0])), step
        clipped += ours.tau.item() == pytest.approx(0.95)
    assert clipped > 0 if clip else ours.tau.item() < 1


@pytest.mark.parametrize('num_classes', [3, 10])
def test_fairness_loss_matches_usb(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    free = FreeMatchThreshold(num_classes, momentum=0.9)
    checked = 0
    for step in range(100):
        probs = random_probs(generator, 16, num_classes)
        _, mask = free(probs)
        if step % 10 == 0:
            mask = torch.zeros(16)  # nothing accepted: no loss, no gradient, no NaN
        label_hist = free.label_hist.clone()
        if step % 7 == 0:
            label_hist[step % num_classes] = 0  # a class never predicted: its weight is 0
        logits = (4 * torch.randn(16, num_classes, generator=generator)).requires_grad_()
        loss = fairness_loss(logits, mask, free.p_model, label_hist)
        loss.backward()
        ours_grad, logits.grad = logits.grad, None
        expected = usb_fairness(mask, logits, free.p_model, label_hist)
        if mask.sum() == 0:
            assert loss.item() == 0.0 and torch.equal(ours_grad, torch.zeros_like(ours_grad))
            continue
        expected.backward()
        assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6), (step, loss.item(), expected.item())
        assert torch.allclose(ours_grad, logits.grad, rtol=1e-4, atol=1e-7), step
        checked += 1
    assert checked > 50


# -----------------------------------------------------------------------------
# FlexMatch by hand: memory[i_b] <- pseudo_b if conf_b >= tau;  sigma(c) = #{i : memory[i] = c};
# beta(c) = sigma(c) / max(max_c sigma, sigma(-1));  T(c) = tau beta(c) / (2 - beta(c)), the mask using T before it


def test_flexmatch_by_hand():
    flex = FlexMatchThreshold(num_classes=3, num_samples=6)  # tau = 0.95
    # nothing selected yet: sigma = 0, beta = 0, T = 0 (every pseudo-label passes, FlexMatch's warm-up)
    close(flex.threshold(), [0, 0, 0])
    pseudo, mask = flex(P([0.97, 0.02, 0.01],    # sample 0: class 0, 0.97 >= 0.95 -> memory 0
                          [0.96, 0.02, 0.02],    # sample 1: class 0, 0.96         -> memory 0
                          [0.005, 0.99, 0.005],  # sample 2: class 1, 0.99         -> memory 1
                          [0.05, 0.05, 0.90],    # sample 3: class 2, 0.90 < tau   -> stays unselected
                          [0.40, 0.35, 0.25]),   # sample 4: class 0, 0.40         -> stays unselected
                        torch.tensor([0, 1, 2, 3, 4]))
    assert pseudo.tolist() == [0, 0, 1, 2, 0]
    assert mask.tolist() == [1.0] * 5  # masked with the thresholds before this batch: all 0
    assert flex.selected.tolist() == [0, 0, 1, -1, -1, -1]
    # sigma = [2, 1, 0], sigma(-1) = 3, so the normaliser is max(2, 3) = 3; beta = [2/3, 1/3, 0]
    # T = 0.95 * [(2/3)/(4/3), (1/3)/(5/3), 0] = [0.475, 0.19, 0]
    close(flex.beta, [2 / 3, 1 / 3, 0])
    close(flex.threshold(), [0.475, 0.19, 0.0])

    pseudo, mask = flex(P([0.02, 0.02, 0.96],    # sample 0 moves from class 0 to class 2; T(2) = 0 accepts it
                          [0.05, 0.90, 0.05],    # sample 1: class 1 at 0.90 >= T(1) = 0.19, but < tau: memory keeps 0
                          [0.01, 0.98, 0.01],    # sample 5: class 1
                          [0.01, 0.02, 0.97],    # sample 3: class 2, twice in the batch:
                          [0.01, 0.02, 0.97],    #           it counts once
                          [0.45, 0.30, 0.25]),   # sample 4: class 0 at 0.45 < T(0) = 0.475: rejected
                        torch.tensor([0, 1, 5, 3, 3, 4]))
    assert mask.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert flex.selected.tolist() == [2, 0, 1, 2, -1, 1]
    # sigma = [1, 2, 2], sigma(-1) = 1, normaliser max(2, 1) = 2; beta = [1/2, 1, 1]
    # T = 0.95 * [(1/2)/(3/2), 1/1, 1/1] = [0.316667, 0.95, 0.95]
    close(flex.beta, [0.5, 1, 1])
    close(flex.threshold(), [0.95 / 3, 0.95, 0.95])

    # the next batch meets those thresholds: sample 1's class 1 at 0.90 < 0.95 is now rejected, 0.40 >= 0.316667 passes
    _, mask = flex(P([0.05, 0.90, 0.05], [0.40, 0.35, 0.25]), torch.tensor([1, 4]))
    assert mask.tolist() == [0.0, 1.0]
    assert flex.selected.tolist() == [2, 0, 1, 2, -1, 1]  # nothing reached tau


def test_flexmatch_memory_takes_conf_at_tau():
    """The memory takes predictions with conf >= tau; the flexible threshold never enters it."""
    flex = FlexMatchThreshold(num_classes=2, num_samples=4, threshold=0.75)
    flex(P([0.75, 0.25], [0.25, 0.75], [0.0625, 0.9375], [0.5625, 0.4375]), torch.tensor([0, 1, 2, 3]))
    assert flex.selected.tolist() == [0, 1, 1, -1]  # 0.75 = tau is taken, 0.5625 is not
    # sigma = [1, 2], sigma(-1) = 1: beta = [1/2, 1]; T = 0.75 * [(1/2)/(3/2), 1] = [0.25, 0.75]
    close(flex.threshold(), [0.25, 0.75])


def test_flexmatch_without_warmup():
    """warmup=False: the normaliser is max_c sigma(c), whatever the number of unused samples."""
    flex = FlexMatchThreshold(num_classes=3, num_samples=6, warmup=False)
    flex(P([0.97, 0.02, 0.01], [0.96, 0.02, 0.02], [0.005, 0.99, 0.005]), torch.tensor([0, 1, 2]))
    # sigma = [2, 1, 0] (sigma(-1) = 3 is left out): beta = [1, 1/2, 0]; T = 0.95 * [1, (1/2)/(3/2), 0]
    close(flex.threshold(), [0.95, 0.95 / 3, 0.0])


def test_flexmatch_beta_held_while_one_value_fills_the_memory():
    flex = FlexMatchThreshold(num_classes=2, num_samples=2, threshold=0.75)
    flex(P([0.9, 0.1], [0.1, 0.9]), torch.tensor([0, 1]))
    close(flex.beta, [1, 1])  # sigma = [1, 1], none unused
    flex(P([0.9, 0.1]), torch.tensor([1]))
    # memory [0, 0]: sigma(0) = 2 = every sample, so beta keeps [1, 1] (a recount would give [1, 0])
    assert flex.selected.tolist() == [0, 0]
    close(flex.beta, [1, 1])
    close(flex.threshold(), [0.75, 0.75])


def test_flexmatch_repeated_sample_keeps_its_last_selected_prediction():
    flex = FlexMatchThreshold(num_classes=3, num_samples=4)
    flex(P([0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.01, 0.01, 0.98]), torch.tensor([2, 2, 0]))
    assert flex.selected.tolist() == [2, -1, 1, -1]  # sample 2: class 0, then class 1
    flex(P([0.01, 0.01, 0.98], [0.50, 0.20, 0.30]), torch.tensor([2, 2]))
    assert flex.selected.tolist() == [2, -1, 2, -1]  # the later row is below tau: it writes nothing


def test_flexmatch_eval_mode_and_state_round_trip():
    flex = FlexMatchThreshold(num_classes=3, num_samples=6)
    flex(P([0.97, 0.02, 0.01], [0.005, 0.99, 0.005]), torch.tensor([0, 5]))
    flex.eval()
    before = {k: v.clone() for k, v in flex.state_dict().items()}
    pseudo, mask = flex(P([0.01, 0.01, 0.98], [0.1, 0.2, 0.7]), torch.tensor([1, 2]))
    assert all(torch.equal(before[k], v) for k, v in flex.state_dict().items())
    # sigma [1, 1, 0], 4 unused: beta = [1/4, 1/4, 0], T = [0.95 * 0.25 / 1.75] * 2 + [0]: class 2 accepts all
    assert mask.tolist() == [1.0, 1.0]
    restored = FlexMatchThreshold(num_classes=3, num_samples=6)
    restored.load_state_dict(flex.state_dict())
    assert torch.equal(restored.selected, flex.selected) and torch.equal(restored.beta, flex.beta)
    close(restored.threshold(), [0.95 * 0.25 / 1.75] * 2 + [0.0])
    batch, index = P([0.3, 0.6, 0.1], [0.96, 0.02, 0.02]), torch.tensor([3, 4])
    flex.train()
    assert [t.tolist() for t in flex(batch, index)] == [t.tolist() for t in restored(batch, index)]
    assert torch.equal(restored.selected, flex.selected) and torch.equal(restored.beta, flex.beta)


def test_flexmatch_many_classes_memory_dtype():
    """every class and -1 must fit the memory's dtype for any C."""
    flex = FlexMatchThreshold(num_classes=200, num_samples=3, threshold=0.5)
    probs = torch.full((1, 200), 0.1 / 199)
    probs[0, 199] = 0.9
    flex(probs, torch.tensor([1]))
    assert flex.selected.tolist() == [-1, 199, -1]
    close(flex.beta[199], 0.5)  # sigma(199) = 1, sigma(-1) = 2


# -----------------------------------------------------------------------------
# FreeMatch by hand: tau_t <- m tau_t + (1 - m) mean_b conf_b;  p(c) <- m p(c) + (1 - m) mean_b q_b(c);
# h(c) <- m h(c) + (1 - m) #{pseudo_b = c} / B;  T(c) = tau_t p(c) / max_c p(c), the mask using T after the update

FREE_BATCH = P([0.70, 0.20, 0.10],   # pseudo 0, conf 0.70
               [0.10, 0.60, 0.30],   # pseudo 1, conf 0.60
               [0.50, 0.20, 0.30],   # pseudo 0, conf 0.50
               [0.34, 0.33, 0.33])   # pseudo 0, conf 0.34


def test_freematch_by_hand():
    free = FreeMatchThreshold(num_classes=3, momentum=0.9)
    close(free.tau, 1 / 3)
    close(free.p_model, [1 / 3] * 3)
    close(free.label_hist, [1 / 3] * 3)
    close(free.threshold(), [1 / 3] * 3)
    pseudo, mask = free(FREE_BATCH)
    # mean conf = (0.70 + 0.60 + 0.50 + 0.34) / 4 = 0.535;  tau = 0.9 / 3 + 0.1 * 0.535 = 0.3535
    close(free.tau, 0.3535)
    # mean q = [1.64, 1.33, 1.03] / 4 = [0.41, 0.3325, 0.2575];  p = 0.3 + 0.1 * mean q = [0.341, 0.33325, 0.32575]
    close(free.p_model, [0.341, 0.33325, 0.32575])
    # pseudo-labels [0, 1, 0, 0]: histogram [3, 1, 0] / 4;  h = 0.3 + 0.1 * [0.75, 0.25, 0] = [0.375, 0.325, 0.3]
    close(free.label_hist, [0.375, 0.325, 0.3])
    # T = 0.3535 * p / 0.341 = [0.3535, 0.345466, 0.337691]
    close(free.threshold(), [0.3535, 0.3535 * 0.33325 / 0.341, 0.3535 * 0.32575 / 0.341])
    assert pseudo.tolist() == [0, 1, 0, 0]
    assert mask.tolist() == [1.0, 1.0, 1.0, 0.0]  # 0.34 < 0.3535


def test_freematch_clip():
    """clip=True (USB's clip_thresh): tau_t is clipped to at most 0.95 after each update."""
    batch = P([0.98, 0.02], [0.96, 0.04])
    # m = 0: tau = mean conf = 0.97, p = [0.97, 0.03], so T(0) = tau
    free = FreeMatchThreshold(num_classes=2, momentum=0.0)
    assert free(batch)[1].tolist() == [1.0, 0.0]  # 0.96 < 0.97
    close(free.tau, 0.97)
    free = FreeMatchThreshold(num_classes=2, momentum=0.0, clip=True)
    assert free(batch)[1].tolist() == [1.0, 1.0]  # 0.96 >= 0.95
    close(free.tau, 0.95)


def test_freematch_eval_and_round_trip():
    free = FreeMatchThreshold(num_classes=3, momentum=0.9)
    free(FREE_BATCH)
    free.eval()
    free(P([0.98, 0.01, 0.01]))
    close(free.tau, 0.3535)  # unchanged in eval mode
    close(free.label_hist, [0.375, 0.325, 0.3])
    restored = FreeMatchThreshold(num_classes=3, momentum=0.9)
    restored.load_state_dict(free.state_dict())
    for name in ('tau', 'p_model', 'label_hist'):
        assert torch.equal(getattr(restored, name), getattr(free, name)), name


def test_fairness_loss_by_hand():
    # p = [0.6, 0.4], h = [0.5, 0.5]: SumNorm(p / h) = SumNorm([1.2, 0.8]) = [0.6, 0.4]
    p_model, label_hist = torch.tensor([0.6, 0.4]), torch.tensor([0.5, 0.5])
    logits = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.9, 0.1]]).log()  # softmax gives these rows back
    mask = torch.tensor([1.0, 1.0, 0.0])
    # accepted rows argmax [0, 1]: hist_s = [1/2, 1/2]; mean q = [0.55, 0.45]; SumNorm(mean q / hist_s) = [0.55, 0.45]
    # L_f = 0.6 log 0.55 + 0.4 log 0.45 = -0.678105
    close(fairness_loss(logits, mask, p_model, label_hist), 0.6 * math.log(0.55) + 0.4 * math.log(0.45), atol=1e-5)
    # accepted rows [0.8, 0.2], [0.9, 0.1]: hist_s = [1, 0], so class 1 gets weight 0: SumNorm([0.85, 0]) = [1, 0]
    # L_f = 0.6 log 1 + 0.4 log(0 + 1e-12) = 0.4 * -27.631021
    close(fairness_loss(logits, torch.tensor([1.0, 0.0, 1.0]), p_model, label_hist), 0.4 * math.log(1e-12), atol=1e-4)
    # h(1) = 0 (class 1 never predicted): SumNorm([1.2, 0]) = [1, 0];  L_f = log 0.55
    close(fairness_loss(logits, mask, p_model, torch.tensor([0.5, 0.0])), math.log(0.55), atol=1e-5)


# -----------------------------------------------------------------------------
# device moves, dtypes, CUDA

@pytest.mark.parametrize('make', [lambda: FlexMatchThreshold(3, 10), lambda: FreeMatchThreshold(3)])
def test_buffers_move_with_to(make):
    policy = make()
    policy.to('meta')  # a device move without a GPU: every piece of state must follow
    for name, tensor in [*policy.named_buffers(), *policy.named_parameters()]:
        assert tensor.device.type == 'meta', name
    policy = make().to(torch.float64)
    for name, tensor in policy.named_buffers():
        assert tensor.dtype in (torch.float64, torch.int16, torch.long), (name, tensor.dtype)
    reference = make()
    index = torch.tensor([0, 1, 2, 3])
    assert torch.equal(policy(FREE_BATCH, index)[1], reference(FREE_BATCH, index)[1])  # still runs, same masks
    close(policy.threshold(), reference.threshold())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_policies_on_cuda_without_host_sync():
    """The update runs on the device of the buffers, without a host synchronisation."""
    generator = torch.Generator().manual_seed(0)
    for make in (lambda: FlexMatchThreshold(4, 30, 0.75), lambda: FreeMatchThreshold(4, 0.9)):
        cpu, gpu = make(), make().cuda()
        for _ in range(20):
            probs, index = random_probs(generator, 16, 4), torch.randint(0, 30, (16,), generator=generator)
            probs_gpu, index_gpu = probs.cuda(), index.cuda()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode('error')
            try:
                got = gpu(probs_gpu, index_gpu)
                loss = fairness_loss(probs_gpu.log(), got[1], gpu.p_model, gpu.label_hist) if hasattr(gpu, 'p_model') \
                    else None
            finally:
                torch.cuda.set_sync_debug_mode('default')
            expected = cpu(probs, index)
            assert [t.tolist() for t in expected] == [t.cpu().tolist() for t in got]
            if loss is not None:
                close(loss, fairness_loss(probs.log(), expected[1], cpu.p_model, cpu.label_hist), atol=1e-5)
        for (name, a), (_, b) in zip(cpu.named_buffers(), gpu.named_buffers()):
            assert b.is_cuda and torch.allclose(a.double(), b.cpu().double(), atol=1e-6), name


# -----------------------------------------------------------------------------
# distributed: two gloo processes, each with its own batch, must end with the state of one process fed the
# union of the two batches (FreeMatch's sums all-reduced, FlexMatch's memory updates gathered)

RANK_BATCHES = [
    # rank 0                                       rank 1
    (P([0.70, 0.20, 0.10], [0.50, 0.30, 0.20]), P([0.90, 0.05, 0.05], [0.10, 0.20, 0.70])),
    (P([0.10, 0.80, 0.10], [0.20, 0.20, 0.60]), P([0.97, 0.02, 0.01], [0.01, 0.96, 0.03])),
]
RANK_INDICES = [(torch.tensor([0, 1]), torch.tensor([2, 3])), (torch.tensor([4, 5]), torch.tensor([1, 5]))]


def make_policies():
    return dict(flexmatch=FlexMatchThreshold(3, num_samples=8, threshold=0.6),
                freematch=FreeMatchThreshold(3, momentum=0.5))


def _distributed_worker(rank, world, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, policy in make_policies().items():
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
    single_masks = {name: [] for name in single}
    for name, policy in single.items():
        for batches, indices in zip(RANK_BATCHES, RANK_INDICES):
            single_masks[name].append(policy(torch.cat(batches), torch.cat(indices))[1])

    for name in single:
        a, b = ranks[0][name], ranks[1][name]
        for key in a['state']:  # both ranks hold exactly the same state
            assert torch.equal(a['state'][key], b['state'][key]), (name, key)
        for key, value in single[name].state_dict().items():
            close(a['state'][key], value)
        close(a['threshold'], single[name].threshold())
        for step, union_mask in enumerate(single_masks[name]):  # each rank's mask is its own rows of the union's
            assert torch.cat([ranks[0][name]['masks'][step], ranks[1][name]['masks'][step]]).tolist() == \
                union_mask.tolist(), (name, step)

    # FlexMatch on the union, tau = 0.6. Step 1 selects sample 0 -> 0, 2 -> 0, 3 -> 2 (sample 1: 0.50 < 0.6):
    # memory [0, -, 0, 2, -, -, -, -]: sigma = [2, 0, 1], sigma(-1) = 5; beta = [2/5, 0, 1/5]
    # Step 2 is masked with T = 0.6 * [0.4 / 1.6, 0, 0.2 / 1.8] = [0.15, 0, 0.066667] (all pass) and selects 4 -> 1,
    # 5 -> 2 (0.60 >= 0.6), 1 -> 0, then 5 -> 1 again on rank 1: the later row wins, memory [0, 0, 0, 2, 1, 1, -, -]
    # sigma = [3, 2, 1], sigma(-1) = 2; beta = [1, 2/3, 1/3]
    # T = 0.6 * [1, (2/3)/(4/3), (1/3)/(5/3)] = [0.6, 0.3, 0.12]
    assert ranks[1]['flexmatch']['state']['selected'].tolist() == [0, 0, 0, 2, 1, 1, -1, -1]
    close(ranks[1]['flexmatch']['threshold'], [0.6, 0.3, 0.12])

    # FreeMatch on the union, m = 0.5: step 1 mean conf = (0.7 + 0.5 + 0.9 + 0.7) / 4 = 0.7, tau = 1/6 + 0.35
    # step 2 mean conf = (0.8 + 0.6 + 0.97 + 0.96) / 4 = 0.8325, tau = 0.5 * 0.516667 + 0.41625 = 0.674583
    close(ranks[1]['freematch']['state']['tau'], 0.5 * (1 / 6 + 0.35) + 0.5 * 0.8325)
    # p after step 1: mean q = [2.2, 0.75, 1.05] / 4;  p = 1/6 + 0.5 * mean q
    # step 2: mean q = [1.28, 1.98, 0.74] / 4;  p = 0.5 p + 0.5 * mean q
    p1 = [1 / 6 + 0.5 * s / 4 for s in (2.2, 0.75, 1.05)]
    p2 = [0.5 * a + 0.5 * s / 4 for a, s in zip(p1, (1.28, 1.98, 0.74))]
    close(ranks[0]['freematch']['state']['p_model'], p2)
    # h: step 1 pseudo-labels [0, 0, 0, 2]: h = 1/6 + 0.5 * [3, 0, 1] / 4
    #    step 2 pseudo-labels [1, 2, 0, 1]: h = 0.5 h + 0.5 * [1, 2, 1] / 4
    h1 = [1 / 6 + 0.5 * s / 4 for s in (3, 0, 1)]
    close(ranks[0]['freematch']['state']['label_hist'], [0.5 * a + 0.5 * s / 4 for a, s in zip(h1, (1, 2, 1))])
