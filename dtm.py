"""
Dynamic Threshold Module (DTM): per-class, adaptive confidence thresholds for pseudo-labels.

For an unlabeled batch with weak-view class probabilities q_b (no gradient):
    pseudo_b = argmax_c q_b(c)            conf_b = max_c q_b(c)
    kappa(c) <- m * kappa(c) + (1 - m) * mean{ conf_b : pseudo_b = c }   for each class c seen in the batch
    T(c)      = clip(kappa(c), T_min, T_max)                  or, relative=True:
    T(c)      = clip(T_max * kappa(c) / max_c' kappa(c'), T_min, T_max)
    mask_b    = [conf_b >= T(pseudo_b)]
kappa starts at 1/C, so early in training every threshold sits at T_min and many pseudo-labels are used; each
rises as the model grows confident in that class, and classes it finds hard or rarely predicts keep lower
thresholds, so they are not starved of pseudo-labels. relative=True holds the class the model is surest of to
T_max and scales the others below it: a weak model whose kappa all stay under T_min cannot then flood the
unlabeled loss with its favourite class. kappa is updated in train mode only, from the batch, before masking;
under torch.distributed the per-class sums and counts are all-reduced, so every rank holds the same thresholds.
FixedThreshold is FixMatch's T(c) = tau, for comparison. Copy this file into your project; it needs only torch:

    from dtm import DynamicThreshold, unlabeled_loss
    dtm = DynamicThreshold(num_classes=8).to(device)           # its state is in buffers: saved in state_dict
    with torch.no_grad(): probs = model(weak_u).softmax(dim=1)
    pseudo, mask = dtm(probs)                                   # updates kappa when dtm.training
    loss = F.cross_entropy(model(weak_x), y) + lambda_u * unlabeled_loss(model(strong_u), pseudo, mask)
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def all_reduce_sum(tensor):
    """Sum a tensor over all ranks in place (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class FixedThreshold(nn.Module):
    """FixMatch: T(c) = tau for every class."""

    def __init__(self, num_classes, threshold=0.95):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer('fixed', torch.full((num_classes,), float(threshold)))

    def threshold(self):
        return self.fixed

    def update(self, confidence, pseudo, probs, index):
        pass  # nothing to learn

    def forward(self, probs, index=None):
        """probs: (N, C) weak-view probabilities. Returns pseudo-labels (N,) and a float mask (N,)."""
        probs = probs.detach().float()
        confidence, pseudo = probs.max(dim=1)
        if self.training:
            self.update(confidence, pseudo, probs, index)
        mask = (confidence >= self.threshold()[pseudo]).float()
        return pseudo, mask

    def extra_loss(self, logits_strong, mask):
        """A threshold's own term of the loss, beside L_u: none for FixMatch and the DTM."""
        return 0


class DynamicThreshold(FixedThreshold):
    """DTM: T(c) = clip(kappa(c), T_min, T_max), kappa(c) = EMA of the mean confidence of predictions of class c;
    relative=True: T(c) = clip(T_max * kappa(c) / max kappa, T_min, T_max)."""

    def __init__(self, num_classes, momentum=0.99, min_threshold=0.7, max_threshold=0.95, relative=False):
        super().__init__(num_classes, max_threshold)
        self.momentum, self.min_threshold, self.max_threshold = momentum, min_threshold, max_threshold
        self.relative = relative
        self.register_buffer('kappa', torch.full((num_classes,), 1.0 / num_classes))

    def threshold(self):
        kappa = self.max_threshold * self.kappa / self.kappa.max() if self.relative else self.kappa
        return kappa.clamp(self.min_threshold, self.max_threshold)

    def update(self, confidence, pseudo, probs, index):
        # per-class sum and count of confidences in this batch, summed over ranks
        stats = torch.zeros(2, self.num_classes, device=confidence.device)
        stats[0].index_add_(0, pseudo, confidence)
        stats[1].index_add_(0, pseudo, torch.ones_like(confidence))
        sums, counts = all_reduce_sum(stats)
        mean = sums / counts.clamp(min=1)
        ema = self.momentum * self.kappa + (1 - self.momentum) * mean
        self.kappa.copy_(torch.where(counts > 0, ema, self.kappa))  # classes absent from the batch keep kappa


def unlabeled_loss(logits_strong, pseudo, mask):
    """L_u = 1/(mu B) sum_b mask_b * CE(f(strong(u_b)), pseudo_b). The sum is divided by the whole unlabeled batch,
    not by the accepted part, so the loss grows with the share of pseudo-labels the threshold accepts."""
    return (F.cross_entropy(logits_strong.float(), pseudo, reduction='none') * mask).mean()
