"""
train.py's running sums: losses, the share of pseudo-labels accepted and, per class, how many were made, accepted
and (where the pool's true labels are known) right. They are kept on the device and read every --log-every steps, so
the step itself never waits for the host.
"""
import sys
import time

import torch
import torch.distributed as dist


class Meter:
    """Sums over the steps since the last report: loss_s, loss_u, mask, steps, skipped, then six per-class counts of
    pseudo-labels: made, accepted; where the true label is known: made, accepted, accepted and right, right."""

    def __init__(self, num_classes, device, step, truth=None, ddp=False):
        self.C, self.truth, self.ddp = num_classes, truth, ddp
        self.sums = torch.zeros(5 + 6 * num_classes, device=device)
        self.first_bad = torch.tensor(sys.maxsize, device=device)  # the first step whose loss was not finite
        self.data_wait, self.skipped_total = 0.0, 0
        self.run_counts = [[0.0] * num_classes for _ in range(6)]  # the per-class counts over the whole run
        self.t_report = self.t_start = time.time()
        self.start_step = step

    @torch.no_grad()
    def add(self, step, loss, loss_s, loss_u, mask, pseudo=None, index=None, skipped=None):
        self.first_bad = torch.where(torch.isfinite(loss), self.first_bad, self.first_bad.clamp(max=step))
        self.sums[:5] += torch.stack([loss_s.detach(), loss_u.detach(), mask.mean(), torch.ones_like(loss_s),
                                      skipped.sum().float() if skipped is not None else torch.zeros_like(loss_s)])
        if pseudo is None:
            return
        C, truth = self.C, self.truth
        known = (truth[index] >= 0).float() if truth is not None else torch.zeros_like(mask)
        right = (truth[index] == pseudo).float() if truth is not None else torch.zeros_like(mask)
        for k, weight in enumerate((None, mask, known, mask * known, mask * right, right)):
            self.sums[5 + k * C:5 + (k + 1) * C] += torch.bincount(pseudo, weights=weight, minlength=C).float()

    def first_bad_step(self):
        """The first step with a non-finite loss on any rank, or None: the one host sync, every few steps."""
        if self.ddp:
            dist.all_reduce(self.first_bad, dist.ReduceOp.MIN)  # one rank's NaN reaches all ranks' weights
        step = self.first_bad.item()
        return step if step < sys.maxsize else None

    def report(self, step, steps, images_per_step, lr, threshold=None, world=1):
        """(the log record, the printed line) of the steps since the last report; the sums start again."""
        totals = torch.cat([self.sums, torch.tensor([self.data_wait], device=self.sums.device)])
        if self.ddp:
            dist.all_reduce(totals)
        totals = totals.tolist()
        n, elapsed = max(totals[3], 1), time.time() - self.t_report
        self.skipped_total += int(totals[4])
        images_per_s = n * images_per_step / elapsed  # through the network
        eta = (steps - step) * (time.time() - self.t_start) / (step - self.start_step)
        record = dict(event='train', step=step, loss_s=totals[0] / n, loss_u=totals[1] / n, lr=lr,
                      images_per_s=images_per_s, data_wait=totals[-1] / world / elapsed, skipped=int(totals[4]))
        line = f'step {step}/{steps} | loss_s {record["loss_s"]:.3f} '
        if threshold is not None:  # the threshold's columns: supervised runs have none
            C = self.C
            thresholds, counts = threshold.threshold().tolist(), [totals[5 + k * C:5 + (k + 1) * C] for k in range(6)]
            self.run_counts = [[a + b for a, b in zip(run, new)] for run, new in zip(self.run_counts, counts)]
            record.update(mask=totals[2] / n, thresholds=thresholds, predicted=counts[0], accepted=counts[1])
            line += f'loss_u {record["loss_u"]:.3f} | mask {record["mask"]:.2f} | ' \
                    f'T {min(thresholds):.2f}..{max(thresholds):.2f} '
            if self.truth is not None:  # precision = accepted_correct / accepted_labeled, recall = .. / correct
                record.update(labeled=counts[2], accepted_labeled=counts[3], accepted_correct=counts[4],
                              correct=counts[5])
                line += f'| precision {sum(counts[4]) / max(sum(counts[3]), 1):.2f} '
        line += f'| {images_per_s:.0f} img/s, data wait {100 * record["data_wait"]:.0f}% | eta {eta / 60:.1f} min'
        if self.skipped_total:
            line += f' | {self.skipped_total} unreadable skipped'
        self.sums.zero_()
        self.data_wait, self.t_report = 0.0, time.time()
        return record, line

    def pseudo_label_quality(self, classes):
        """Lines for the end of a run where the pool's true labels are known: per class, the pseudo-labels accepted,
        their precision (right / accepted) and recall (accepted / right, of the teacher's right ones)."""
        _, accepted, _, accepted_labeled, accepted_right, right = self.run_counts
        lines = [f'pseudo-labels over the run: precision {sum(accepted_right) / max(sum(accepted_labeled), 1):.3f} '
                 f'({int(sum(accepted_right))} right of {int(sum(accepted_labeled))} accepted), '
                 f'recall {sum(accepted_right) / max(sum(right), 1):.3f}',
                 f'{"class":12} {"accepted":>9} {"precision":>9} {"recall":>7}']
        for c, name in enumerate(classes):
            lines.append(f'{name[:12]:12} {int(accepted[c]):9d} {accepted_right[c] / max(accepted_labeled[c], 1):9.3f} '
                         f'{accepted_right[c] / max(right[c], 1):7.3f}')
        return '\n'.join(lines)
