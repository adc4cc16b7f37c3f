"""
data.Augment's views made the GPU's way, the same views to the bit (tests/test_augment.py): every image goes through
every RandAugment operation and keeps the one it drew (torch.where), so a batch's work has one shape whatever it drew
and never waits for the host; that work, a few hundred small kernels, is captured once per batch shape as a CUDA
graph and replayed as one launch; the parameters, drawn on the CPU as data.Augment draws them, reach the GPU in one
pinned, asynchronous copy. On the CPU, where the work is what costs, data.Augment's way does 14 times less of it.
"""
import torch

import data
from fast.cuda_graphs import CudaGraphs

ROUND_COLUMNS = 2  # a RandAugment round's parameters per image: op, magnitude
# the geometric operations of data.RANDAUGMENT as the matrices they warp by, so that one warp serves all five
# (tests/test_augment.py holds these views to data.Augment's, bit for bit)
MATRICES = {
    'ShearX': lambda images, m: data.affine_matrix(images, m, shear_x=torch.rad2deg(torch.atan(m)), about_corner=True),
    'ShearY': lambda images, m: data.affine_matrix(images, m, shear_y=torch.rad2deg(torch.atan(m)), about_corner=True),
    'TranslateX': lambda images, m: data.affine_matrix(images, m, translate_x=m.trunc()),
    'TranslateY': lambda images, m: data.affine_matrix(images, m, translate_y=m.trunc()),
    'Rotate': lambda images, m: data.affine_matrix(images, m, angle=-m),
}


class GpuAugment(data.Augment):

    def __init__(self, img_size, num_ops=2, magnitude=10, cuda_graphs=True):
        super().__init__(img_size, num_ops, magnitude)
        graphed = CudaGraphs if cuda_graphs else (lambda make: make)
        self.labeled_on_device, self.unlabeled_on_device = graphed(self.labeled_from), graphed(self.unlabeled_from)

    def labeled_view(self, images, generator):
        return self.labeled_on_device(images, to_device(self.draw_weak(len(images), generator), images))

    def unlabeled_views(self, images, generator):
        weak, strong, rounds, box = self.draw_unlabeled(len(images), generator)
        rounds = [torch.stack([op.double(), magnitude], 1) for op, magnitude in rounds]
        return self.unlabeled_on_device(images, to_device(torch.cat([weak, strong, *rounds, box], 1), images))

    def labeled_from(self, images, weak):
        return data.normalize(self.weak_from(images, weak))

    def unlabeled_from(self, images, parameters):
        weak, strong, *rounds, box = parameters.split([3, 3] + [ROUND_COLUMNS] * self.num_ops + [4], 1)
        return self.views_from(images, weak, strong, [(r[:, 0].long(), r[:, 1]) for r in rounds], box)

    def apply(self, images, op, magnitude):
        """Every image through every operation, each keeping the one it drew; the geometric ones as one warp, each
        image by its own operation's matrix (the identity for the others: the image itself)."""
        op, magnitude = op.to(images.device), magnitude.to(images.device)
        matrices = torch.eye(2, 3, dtype=magnitude.dtype, device=images.device).expand(len(images), 2, 3)
        for name, matrix in MATRICES.items():
            drew = (op == self.names.index(name)).view(-1, 1, 1)
            matrices = torch.where(drew, matrix(images, magnitude), matrices)
        out = data.warp(images, matrices)
        for k, (name, operation) in enumerate(zip(self.names, self.operations)):
            if name not in MATRICES and operation is not data.identity:
                out = torch.where((op == k).view(-1, 1, 1, 1), operation(images, magnitude), out)
        return out


def to_device(parameters, images):
    """CPU-drawn parameters to the images' device, pinned: a copy from pageable memory would wait for the GPU to
    finish its queue."""
    return parameters.pin_memory().to(images.device, non_blocking=True) if images.is_cuda else parameters
