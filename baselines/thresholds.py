"""
The thresholds the DTM is compared with (train.py --threshold flexmatch | freematch), as USB implements them
(github.com/microsoft/Semi-supervised-learning), on dtm.py's interface: threshold(), update(), forward(probs, index),
extra_loss(logits_strong, mask).
For an unlabeled batch with weak-view probabilities q_b: pseudo_b = argmax_c q_b(c), conf_b = max_c q_b(c).

FlexMatch, semilearn/algorithms/flexmatch/utils.py (FlexMatchThresholdingHook.masking, then .update):
    mask_b    = [conf_b >= T(pseudo_b)]                    with T of the previous step, then
    memory[i_b] <- pseudo_b  for every b with conf_b >= tau  (memory starts at -1 = never selected)
    sigma(c)  = #{i : memory[i] = c}
    beta(c)   = sigma(c) / max(max_c sigma(c), sigma(-1))  warmup=True (thresh_warmup); warmup=False drops sigma(-1)
                (beta keeps its last value while a single value fills the whole memory, at first all -1: beta = 0)
    T(c)      = tau * beta(c) / (2 - beta(c))                the convex mapping
  tau = 0.95, warmup=True: p_cutoff and thresh_warmup of every config/classic_cv/flexmatch/*.yaml.

FreeMatch, semilearn/algorithms/freematch/utils.py (FreeMatchThresholdingHook.update, then .masking):
    tau_t <- m tau_t + (1 - m) mean_b conf_b                 self-adaptive global threshold, tau_0 = 1/C
    p(c)  <- m p(c)  + (1 - m) mean_b q_b(c)                 self-adaptive local thresholds, p_0(c) = 1/C
    h(c)  <- m h(c)  + (1 - m) #{b : pseudo_b = c} / B       label histogram (for fairness_loss), h_0(c) = 1/C
    T(c)  = tau_t * p(c) / max_c p(c),   mask_b = [conf_b >= T(pseudo_b)]
  m = 0.999: ema_p of every config/classic_cv/freematch/*.yaml; clip=True clips tau_t to [0, 0.95] after each update
  (clip_thresh, set by the SVHN configs only); the quantile option (use_quantile) is off in all of them.
  fairness_loss is FreeMatch's self-adaptive fairness term, entropy_loss in semilearn/algorithms/freematch/freematch.py,
  weighted by ent_loss_ratio = 0.001 in the same configs.

Every rank applies every rank's batch (USB's FreeMatch gathers the batch too; its FlexMatch keeps a memory per rank),
so all ranks hold the same state as one process fed the union of their batches.
"""
import torch
import torch.distributed as dist

from dtm import FixedThreshold, all_reduce_sum


class FlexMatchThreshold(FixedThreshold):
    """FlexMatch (curriculum pseudo-labelling): T(c) = tau beta(c) / (2 - beta(c)), beta(c) the share of the
    unlabeled set last selected (conf >= tau) as class c. Needs the dataset index of every unlabeled sample."""

    def __init__(self, num_classes, num_samples, threshold=0.95, warmup=True):
        super().__init__(num_classes, threshold)
        self.num_samples, self.warmup = num_samples, warmup
        self.register_buffer('selected', torch.full((num_samples,), -1, dtype=torch.int16 if num_classes < 2 ** 15
                                                    else torch.long))  # -1 = never selected
        self.register_buffer('beta', torch.zeros(num_classes))

    def threshold(self):
        return self.fixed * (self.beta / (2 - self.beta))

    def forward(self, probs, index=None):
        """As FixedThreshold.forward, but the mask uses T of the previous step: FlexMatch masks, then updates."""
        probs = probs.detach().float()
        confidence, pseudo = probs.max(dim=1)
        mask = (confidence >= self.threshold()[pseudo]).float()
        if self.training:
            self.update(confidence, pseudo, probs, index)
        return pseudo, mask

    def update(self, confidence, pseudo, probs, index):
        index, selected = index.long(), confidence >= self.fixed[0]
        if dist.is_available() and dist.is_initialized():  # every rank applies every rank's update
            batch = torch.stack([index, pseudo, selected.long()])
            parts = [torch.empty_like(batch) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, batch)
            index, pseudo, selected = torch.cat(parts, dim=1)
            selected = selected.bool()
        # a sample repeated in the batch takes its last selected prediction, as USB's write does on the CPU: order the
        # rows by (sample, selected, position) and send each row its sample's last one; without a host sync
        n = len(index)
        order = ((index * 2 + selected) * n + torch.arange(n, device=index.device)).argsort()
        last = order[torch.searchsorted(index[order], index, right=True) - 1]
        new = torch.where(selected[last], pseudo[last], self.selected[index].long())
        self.selected[index] = new.to(self.selected.dtype)
        # sigma(-1), sigma(0), ..., sigma(C-1)
        sigma = torch.zeros(self.num_classes + 1, dtype=torch.long, device=index.device)
        sigma.index_add_(0, self.selected.long() + 1, torch.ones_like(self.selected, dtype=torch.long))
        largest = sigma.max() if self.warmup else sigma[1:].max()
        beta = sigma[1:].float() / largest.clamp(min=1)
        self.beta.copy_(torch.where(sigma.max() < self.num_samples, beta, self.beta))


class FreeMatchThreshold(FixedThreshold):
    """FreeMatch (self-adaptive thresholding): T(c) = tau_t p(c) / max_c p(c), tau_t the EMA of the mean confidence,
    p(c) the EMA of the mean probability of class c; h(c), the EMA of the predicted-class histogram, is for
    fairness_loss."""

    def __init__(self, num_classes, momentum=0.999, clip=False):
        super().__init__(num_classes, 1.0 / num_classes)
        self.momentum, self.clip = momentum, clip
        self.register_buffer('p_model', torch.ones(num_classes) / num_classes)
        self.register_buffer('label_hist', torch.ones(num_classes) / num_classes)
        self.register_buffer('tau', self.p_model.mean())

    def threshold(self):
        return self.tau * (self.p_model / self.p_model.max())

    def update(self, confidence, pseudo, probs, index):
        hist = torch.zeros_like(probs[0]).index_add_(0, pseudo, torch.ones_like(confidence))
        stats = torch.cat([confidence.sum().view(1), probs.sum(dim=0), hist, probs.new_full((1,), len(probs))])
        confidence_sum, probs_sum, hist, count = all_reduce_sum(stats).split([1, self.num_classes, self.num_classes, 1])
        m = self.momentum
        self.tau.copy_(self.tau * m + (1 - m) * (confidence_sum[0] / count[0]))
        if self.clip:
            self.tau.clamp_(0.0, 0.95)
        self.p_model.copy_(self.p_model * m + (1 - m) * (probs_sum / count))
        self.label_hist.copy_(self.label_hist * m + (1 - m) * (hist / count))

    def extra_loss(self, logits_strong, mask):
        """FreeMatch's fairness term, weighted by ent_loss_ratio = 0.001."""
        return 0.001 * fairness_loss(logits_strong, mask, self.p_model, self.label_hist)


def fairness_loss(logits_strong, mask, p_model, label_hist):
    """FreeMatch's self-adaptive fairness L_f = sum_c pbar(c) log sbar(c), the negative cross-entropy between
    pbar = SumNorm(p / h) and sbar = SumNorm(mean_b q_s,b / hist_s) over the accepted samples (mask_b = 1), where
    q_s,b = softmax(logits_strong_b) and hist_s is the histogram of their argmax; minimising it spreads the strong-view
    predictions over the classes. 0 when no sample is accepted. A class with h(c) = 0 or hist_s(c) = 0 gets weight 0."""
    probs = logits_strong.float().softmax(dim=1)
    mask = mask.float()
    count = mask.sum()
    hist = torch.zeros_like(probs[0]).index_add_(0, probs.argmax(dim=1), mask) / count.clamp(min=1)
    mean_probs = (probs * mask[:, None]).sum(dim=0) / count.clamp(min=1)
    target = p_model * torch.where(label_hist > 0, 1 / label_hist, 0)
    target = target / target.sum()
    strong = mean_probs * torch.where(hist > 0, 1 / hist, 0)
    strong = strong / strong.sum().clamp(min=torch.finfo(strong.dtype).tiny)  # stays finite with nothing accepted
    return torch.where(count > 0, (target * torch.log(strong + 1e-12)).sum(), 0.0)
