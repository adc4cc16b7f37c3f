"""
The thresholds the DTM is compared with, on dtm.py's interface (threshold(), update(), forward(probs, index)):
train.py --threshold flexmatch | freematch.
"""
import torch
import torch.distributed as dist

from dtm import FixedThreshold, all_reduce_sum


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
