"""
Dynamic Threshold Module (DTM): per-class, adaptive confidence thresholds for pseudo-labels.

For an unlabeled batch with weak-view class probabilities q_b (no gradient):
    pseudo_b = argmax_c q_b(c)            conf_b = max_c q_b(c)
    kappa(c) <- m * kappa(c) + (1 - m) * mean{ conf_b : pseudo_b = c }   for each class c seen in the batch
    T(c)      = clip(kappa(c), T_min, T_max)                  or, relative=True:
    T(c)      = clip(T_max * kappa(c) / max_c' kappa(c'), T_min, T_max)     (FreeMatch's per-class form)
    mask_b    = [conf_b >= T(pseudo_b)]
kappa starts at 1/C, so early in training thresholds are low and many pseudo-labels are used; they rise as the
model grows confident, and classes it finds hard (or rarely predicts) keep lower thresholds, so they are not
starved of pseudo-labels. relative=True scales kappa so that the class the model is surest of on average always has
T_max (all classes start there) and the others sit below it in proportion: where every kappa stays under T_min (a
weak model, or faces unlike the labeled ones) the plain form is one fixed threshold, and the class the model is
surest of can flood the unlabeled loss; the relative form holds that class to T_max, as FixMatch would. The
statistics are updated in train mode only, from the current batch, before masking.
Under torch.distributed the per-class sums and counts are all-reduced, so every rank holds the same thresholds.

FixedThreshold (FixMatch), FlexMatchThreshold and FreeMatchThreshold share the interface, for comparison.
Copy this file into your project; it needs only torch:

    from dtm import DynamicThreshold
    dtm = DynamicThreshold(num_classes=8).to(device)           # its state is in buffers: saved in state_dict
    with torch.no_grad(): probs = model(weak_u).softmax(dim=1)
    pseudo, mask = dtm(probs)                                   # updates kappa when dtm.training
    loss_u = (F.cross_entropy(model(strong_u), pseudo, reduction='none') * mask).mean()
"""
import torch
import torch.distributed as dist
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


class FlexMatchThreshold(FixedThreshold):
    """FlexMatch: sigma(c) = #samples whose last confident (conf > tau) prediction is c;
    beta(c) = sigma(c) / max(max_c sigma, #never selected); T(c) = tau * beta(c) / (2 - beta(c)).
    Needs the dataset index of every unlabeled sample. Counts live on the device, updated from the batch."""

    def __init__(self, num_classes, num_samples, threshold=0.95):
        super().__init__(num_classes, threshold)
        self.register_buffer('selected', torch.full((num_samples,), num_classes, dtype=torch.int8 if num_classes < 127
                                                    else torch.int16))  # class C = never selected
        self.register_buffer('sigma', torch.zeros(num_classes + 1, dtype=torch.long))
        self.sigma[num_classes] = num_samples

    def threshold(self):
        beta = self.sigma[:-1].float() / torch.maximum(self.sigma[:-1].max(), self.sigma[-1]).clamp(min=1)
        return self.fixed * beta / (2 - beta)

    def update(self, confidence, pseudo, probs, index):
        if dist.is_available() and dist.is_initialized():  # every rank applies every rank's update
            batch = torch.stack([index.double(), pseudo.double(), confidence.double()])
            parts = [torch.empty_like(batch) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, batch)
            index, pseudo, confidence = torch.cat(parts, dim=1)
            index, pseudo = index.long(), pseudo.long()
        confident = confidence > self.fixed[0]  # the memory uses the fixed tau; only the mask is flexible
        index, new = index[confident], pseudo[confident]
        index, first = torch.unique(index, return_inverse=True)  # a sample seen twice in one batch counts once
        new = torch.empty_like(index).scatter_(0, first, new)
        old = self.selected[index].long()
        self.sigma.index_add_(0, old, -torch.ones_like(old))
        self.sigma.index_add_(0, new, torch.ones_like(new))
        self.selected[index] = new.to(self.selected.dtype)


class FreeMatchThreshold(FixedThreshold):
    """FreeMatch (self-adaptive): tau_t = EMA of the mean confidence, p(c) = EMA of the mean probability of class c,
    T(c) = tau_t * p(c) / max_c p(c)."""

    def __init__(self, num_classes, momentum=0.999):
        super().__init__(num_classes, 1.0 / num_classes)
        self.momentum = momentum
        self.register_buffer('tau', torch.tensor(1.0 / num_classes))
        self.register_buffer('p_model', torch.full((num_classes,), 1.0 / num_classes))

    def threshold(self):
        return self.tau * self.p_model / self.p_model.max()

    def update(self, confidence, pseudo, probs, index):
        stats = torch.cat([confidence.sum().view(1), probs.sum(dim=0), probs.new_full((1,), len(probs))])
        stats = all_reduce_sum(stats)
        count = stats[-1]
        self.tau.lerp_(stats[0] / count, 1 - self.momentum)
        self.p_model.lerp_(stats[1:-1] / count, 1 - self.momentum)


class DistributionAlignment(nn.Module):
    """ReMixMatch's distribution alignment, for any of the thresholds above (apply it to probs before them):
        p_model <- m * p_model + (1 - m) * mean_b q_b        q~_b = normalize(q_b * p_target(c) / p_model(c))
    A model that calls most unlabeled faces one class (faces unlike its labeled ones: colour, pose, framing) has that
    class scaled down until its pseudo-labels mix like p_target (the labeled class prior), so self-training cannot
    feed on one class. p_model starts at p_target; updated in train mode only; all-reduced under torch.distributed."""

    def __init__(self, target, momentum=0.99):
        super().__init__()
        self.momentum = momentum
        target = torch.as_tensor(target, dtype=torch.float32)
        self.register_buffer('target', target / target.sum())
        self.register_buffer('p_model', self.target.clone())

    def forward(self, probs):
        probs = probs.detach().float()
        if self.training:
            stats = all_reduce_sum(torch.cat([probs.sum(dim=0), probs.new_full((1,), len(probs))]))
            self.p_model.lerp_(stats[:-1] / stats[-1], 1 - self.momentum)
        aligned = probs * (self.target / self.p_model.clamp(min=1e-6))
        return aligned / aligned.sum(dim=1, keepdim=True)
