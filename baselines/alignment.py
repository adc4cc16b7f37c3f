"""
Distribution alignment (ReMixMatch, Berthelot et al. 2020; USB's DistAlignEMAHook), in front of any threshold of
dtm.py's interface (train.py --align). A pool whose class mix differs from the labeled set's, such as
face-recognition photos that are mostly neutral and happy, pulls the teacher's predictions toward its majority
classes, and self-training confirms the pull. Alignment rescales the teacher's probabilities q_b toward the labeled
class mix p_target before the threshold sees them:

    p_model <- m * p_model + (1 - m) * mean_b q_b           the teacher's running class mix (the first batch sets it)
    q~_b    = Normalize(q_b * p_target / p_model)           then pseudo-labels and the mask from q~_b as usual

m = 0.99, the DTM's own momentum (ReMixMatch averages the last 128 batches). Under torch.distributed the batch mean
is taken over all ranks, so every rank holds the same p_model.
"""
import torch
from torch import nn

from dtm import all_reduce_sum


class DistributionAlignment(nn.Module):
    def __init__(self, threshold, labeled_counts, momentum=0.99):
        super().__init__()
        self.inner, self.momentum = threshold, momentum
        self.register_buffer('target', labeled_counts.float() / labeled_counts.sum())
        self.register_buffer('model', torch.zeros_like(self.target))  # zeros: no batch seen yet

    def threshold(self):
        return self.inner.threshold()

    def extra_loss(self, logits_strong, mask):
        return self.inner.extra_loss(logits_strong, mask)

    def forward(self, probs, index=None):
        probs = probs.detach().float()
        if self.training:
            total = all_reduce_sum(torch.cat([probs.sum(0), probs.new_tensor([len(probs)])]))
            mean = total[:-1] / total[-1]
            self.model.copy_(torch.where(self.model.sum() > 0, self.momentum * self.model + (1 - self.momentum) * mean,
                                         mean))
        aligned = probs * (self.target + 1e-6) / (self.model + 1e-6)
        return self.inner(aligned / aligned.sum(dim=1, keepdim=True), index)
