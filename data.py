"""
Data pipeline: labeled sets and unlabeled pools decoded to uint8 tensors, samplers and batch streams, and the weak
and strong augmentation of whole batches on the training device.

Where the images come from is sources/: formats.py (labeled sets as their owners ship them), pools.py (unlabeled
faces: folders, RecordIO, labeled sets) and faces.py (the built-in procedural faces). Loader workers only read and
decode (Decode); the training step augments each batch where it trains (Augment), with parameters drawn per image
from a seeded generator, so no worker's CPU time bounds a GPU step.
    python data.py PATH [PATH ...] [--json]    shows what a dataset holds before you train on it (format, images
                                               per class and split, what was skipped and why; for a pool, its size
                                               and how many files open as images)
    python data.py                             generates the built-in face set into data/faces
"""
import argparse
import bisect
import contextlib
import functools
import itertools
import json
import math
import os
import re
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.transforms import v2

from sources import faces, formats, pools

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

# -----------------------------------------------------------------------------
# decoding: loaders deliver uint8 images at the training size; augmentation happens batched, on the device


class Decode:
    """PIL image -> uint8 tensor (3, img_size, img_size). grey=True turns every image grey (3 equal channels): a model
    trained on grey labeled faces (FER2013) never sees colour, so colour unlabeled faces (LFW) would lie outside its
    domain."""

    def __init__(self, img_size, grey=False):
        self.size, self.grey = img_size, grey
        self.resize = v2.Resize((img_size, img_size), antialias=True)

    def __call__(self, image):
        image = v2.functional.pil_to_tensor(image)
        if self.grey:  # ITU-R 601 luma, as PIL's convert('L')
            image = v2.functional.rgb_to_grayscale(image, num_output_channels=3)
        return image if image.shape[-2:] == (self.size, self.size) else self.resize(image)


def normalize(images):
    """uint8 images (N, 3, H, W), on any device -> float32: ToDtype(float32, scale=True) then Normalize(MEAN, STD),
    channel by channel with Python numbers (a constant tensor would be a copy to the device)."""
    x = images.to(torch.float32).div_(255)
    for channel, (mean, std) in enumerate(zip(MEAN, STD)):
        x[:, channel].sub_(mean).div_(std)
    return x


# -----------------------------------------------------------------------------
# augmentation: whole batches, on whatever device they are on, every random parameter drawn per sample on the CPU


def randaugment_ops(img_size, magnitude=10, bins=31):
    """torchvision v2.RandAugment's operations, in its order: name -> (magnitude at `magnitude` of `bins`, whether
    it is negated half of the time). The magnitudes are computed as torchvision computes them (float32 linspace),
    so a threshold such as Solarize's 255 * 2/3 compares to pixels exactly as there."""
    def at(values):
        return float(values[magnitude])
    posterize_bits = (8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int()
    return {'Identity': (0.0, False),
            'ShearX': (at(torch.linspace(0.0, 0.3, bins)), True),
            'ShearY': (at(torch.linspace(0.0, 0.3, bins)), True),
            'TranslateX': (at(torch.linspace(0.0, 150.0 / 331.0 * img_size, bins)), True),
            'TranslateY': (at(torch.linspace(0.0, 150.0 / 331.0 * img_size, bins)), True),
            'Rotate': (at(torch.linspace(0.0, 30.0, bins)), True),
            'Brightness': (at(torch.linspace(0.0, 0.9, bins)), True),
            'Color': (at(torch.linspace(0.0, 0.9, bins)), True),
            'Contrast': (at(torch.linspace(0.0, 0.9, bins)), True),
            'Sharpness': (at(torch.linspace(0.0, 0.9, bins)), True),
            'Posterize': (at(posterize_bits), False),
            'Solarize': (at(torch.linspace(1.0, 0.0, bins)), False),
            'AutoContrast': (0.0, False),
            'Equalize': (0.0, False)}


GEOMETRIC = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate')
ROUND_COLUMNS = 3  # a RandAugment round's parameters per image: op, magnitude, place in the sorted order


class Augment:
    """FixMatch's views of uint8 batches (N, 3, S, S), made on the device the batch is on:
        weak    RandomHorizontalFlip + RandomCrop(S, padding=S // 8, padding_mode='reflect')
        strong  weak + RandAugment(num_ops=2, magnitude=10 of its 0..30, fill 0), as torchvision's v2.RandAugment
        cutout  RandomErasing(p=1, scale=(0.02, 0.15), ratio=(0.3, 3.3), value=0), on the normalised strong view
    Each image gets its own parameters (flip, offsets, operations, signs, box), all drawn on the CPU from the
    `generator` passed in and moved to the images' device in one copy: a batch's views are a function of the
    generator's seed alone, the same on the CPU and a GPU, and a run that seeds it from the step number makes the same
    views again when resumed. The operations match torchvision's v2.functional image by image (tests/test_augment.py).

    RandAugment runs one of two ways, with the same result. `every_image`: every image goes through every operation
    and keeps the one it drew (torch.where), so a batch's work has one shape whatever it drew; on a GPU that work, a
    few hundred small kernels, is captured once per batch shape as a CUDA graph and replayed as one launch
    (CudaGraphs). Otherwise the images are sorted by the operation they drew and each operation runs on its own slice:
    eight times less work, in a few hundred launches. Neither waits for the host: the draws, and so the slices, are
    known on the CPU. The default is every_image on a GPU, where launches cost more than the work, and the slices on
    the CPU, where the work is what costs (tools/bench.py measures both)."""

    def __init__(self, img_size, *, num_ops=2, magnitude=10, every_image=None, cuda_graphs=True):
        self.size, self.pad, self.num_ops = img_size, img_size // 8, num_ops
        ops = randaugment_ops(img_size, magnitude)
        self.names = list(ops)
        self.magnitudes = torch.tensor([m for m, _ in ops.values()], dtype=torch.float64)
        self.signed = torch.tensor([signed for _, signed in ops.values()])
        geometric = [k for k, name in enumerate(self.names) if name in GEOMETRIC]
        assert geometric == list(range(geometric[0], geometric[-1] + 1)), 'the sorted way warps them as one slice'
        self.geometric = geometric[0], geometric[-1]
        self.every_image = every_image  # None: chosen per batch (use_every_image)
        graphed = CudaGraphs if cuda_graphs else lambda fn: fn
        self.labeled_on_device, self.unlabeled_on_device = graphed(self.make_labeled), graphed(self.make_unlabeled)

    # the two entry points of the training step: normalised float views

    def labeled_view(self, images, generator):
        return self.run(self.labeled_on_device, images, self.draw_weak(len(images), generator))

    def unlabeled_views(self, images, generator):
        """(weak, strong with Cutout), normalised: both from the same images, each with its own weak draw."""
        n = len(images)
        parameters = [self.draw_weak(n, generator), self.draw_weak(n, generator)]
        rounds = [self.draw_round(n, generator) for _ in range(self.num_ops)]
        parameters += [self.round_parameters(op, magnitude) for op, magnitude in rounds]
        parameters.append(self.draw_cutout(n, generator))
        parameters = torch.cat(parameters, 1)
        if self.use_every_image(images):
            return self.run(self.unlabeled_on_device, images, parameters)
        counts = [torch.bincount(op, minlength=len(self.names)).tolist() for op, _ in rounds]
        return self.run(lambda *tensors: self.make_unlabeled(*tensors, counts=counts), images, parameters)

    def use_every_image(self, images):
        return images.is_cuda if self.every_image is None else self.every_image

    def run(self, make, images, parameters):
        """make(images, parameters) with the CPU-drawn parameters copied to the images' device: pinned, so the copy
        does not wait for the GPU to finish its queue."""
        if images.is_cuda:
            parameters = parameters.pin_memory().to(images.device, non_blocking=True)
        return make(images, parameters)

    def make_labeled(self, images, weak):
        return normalize(self.weak_from(images, weak))

    def make_unlabeled(self, images, parameters, counts=None):
        """counts[r][k]: how many images drew operation k in round r, for the sorted way; None for every_image."""
        weak, strong, *rounds, box = parameters.split([3, 3] + [ROUND_COLUMNS] * self.num_ops + [4], 1)
        strong = self.weak_from(images, strong)
        for r, round_parameters in enumerate(rounds):
            strong = self.apply_from(strong, round_parameters, counts and counts[r])
        return normalize(self.weak_from(images, weak)), self.cutout_from(normalize(strong), box)

    # the parameters, drawn on the CPU, one row per image, float64

    def draw_weak(self, n, generator):
        """(flip, top, left): a flip with probability 1/2, a crop offset of 0 .. 2 * pad each way."""
        flip = (torch.rand(n, generator=generator) < 0.5).double()
        top, left = torch.randint(0, 2 * self.pad + 1, (2, n), generator=generator).double()
        return torch.stack([flip, top, left], 1)

    def draw_round(self, n, generator):
        """One RandAugment round: every image takes one of the 14 operations uniformly at random, at the fixed
        magnitude, negated with probability 1/2 where the operation is signed. -> (op, magnitude)."""
        op = torch.randint(len(self.names), (n,), generator=generator)
        negate = torch.rand(n, generator=generator) <= 0.5
        return op, self.magnitudes[op] * torch.where(self.signed[op] & negate, -1.0, 1.0)

    def round_parameters(self, op, magnitude):
        """(op, magnitude, place) per image: place lists the images in the order of the operations they drew."""
        return torch.stack([op.double(), magnitude.double(), torch.sort(op, stable=True).indices.double()], 1)

    def draw_cutout(self, n, generator):
        """(top, left, h, w) of a box per view: its area a uniform 2-15% of the image, its aspect ratio h/w
        log-uniform in [0.3, 3.3], its corner uniform where it fits. RandomErasing retries boxes that do not fit;
        these always do (at most sqrt(0.15 * 3.3) = 0.7 of a side)."""
        s = self.size
        area = s * s * (0.02 + 0.13 * torch.rand(n, generator=generator, dtype=torch.float64))
        ratio = torch.exp(math.log(0.3) + math.log(3.3 / 0.3) * torch.rand(n, generator=generator, dtype=torch.float64))
        h, w = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
        top = (torch.rand(n, generator=generator, dtype=torch.float64) * (s - h + 1)).floor()
        left = (torch.rand(n, generator=generator, dtype=torch.float64) * (s - w + 1)).floor()
        return torch.stack([top, left, h, w], 1)

    # the views, from images and their parameters on one device

    def weak_from(self, images, weak):
        """The flip and the translation are a choice of source pixel, so the view is a gather: row y of the view is
        row reflect(y + top - pad) of the image, and column x is column reflect(x + left - pad), mirrored
        (S - 1 - column) if flipped."""
        n, s = len(images), self.size
        flip, top, left = weak.long().unbind(1)
        pixels = torch.arange(s, device=images.device)
        rows = reflect(pixels + top[:, None] - self.pad, s)
        cols = reflect(pixels + left[:, None] - self.pad, s)
        cols = torch.where(flip[:, None] == 1, s - 1 - cols, cols)
        source = (rows[:, :, None] * s + cols[:, None, :]).view(n, 1, s * s)  # flat pixel index
        return images.flatten(2).gather(2, source.expand(n, 3, s * s)).view(n, 3, s, s)

    def apply_from(self, images, parameters, counts=None):
        """Image i through operation names[op[i]] at magnitude[i]; the geometric operations are an affine warp with a
        matrix per image. Every image through every operation (counts None), or by slices of the images sorted by
        operation, counts[k] of them drew operation k."""
        op, magnitude, order = parameters[:, 0].long(), parameters[:, 1], parameters[:, 2].long()
        matrices = affine_matrices(op, magnitude, self.names, self.size, self.size)
        m = magnitude.to(torch.float32).view(-1, 1, 1, 1)
        if counts is None:
            out = warp(images, matrices)  # the identity matrix for the colour operations: the image itself
            for k, name in enumerate(self.names):
                if name in COLOUR_OPS:
                    out = torch.where((op == k).view(-1, 1, 1, 1), COLOUR_OPS[name](images, m), out)
            return out
        images, m, matrices = images[order], m[order], matrices[order]
        out, ends = images.clone(), list(itertools.accumulate(counts))  # Identity: the image itself
        for k, name in enumerate(self.names):
            if name in COLOUR_OPS and counts[k]:
                chosen = slice(ends[k] - counts[k], ends[k])
                out[chosen] = COLOUR_OPS[name](images[chosen], m[chosen])
        first, last = self.geometric  # next to each other in the table: one slice, one warp
        geometric = slice(ends[first] - counts[first], ends[last])
        if ends[last] > ends[first] - counts[first]:
            out[geometric] = warp(images[geometric], matrices[geometric])
        return torch.empty_like(out).index_copy_(0, order, out)  # back in the batch's order

    def cutout_from(self, views, box):
        top, left, h, w = box.long()[:, :, None].unbind(1)
        pixels = torch.arange(self.size, device=views.device)
        rows, cols = (top <= pixels) & (pixels < top + h), (left <= pixels) & (pixels < left + w)
        return views.masked_fill((rows[:, :, None] & cols[:, None, :])[:, None], 0)

    # single steps, with parameters drawn (or given) on the CPU: what the tests hold against torchvision

    def weak(self, images, generator):
        return self.run(self.weak_from, images, self.draw_weak(len(images), generator))

    def randaugment(self, images, generator):
        for _ in range(self.num_ops):
            images = self.apply(images, *self.draw_round(len(images), generator))
        return images

    def apply(self, images, op, magnitude):
        counts = None if self.use_every_image(images) else torch.bincount(op, minlength=len(self.names)).tolist()
        parameters = self.round_parameters(op, magnitude)
        return self.run(lambda *tensors: self.apply_from(*tensors, counts), images, parameters)

    def cutout(self, views, generator):
        return self.run(self.cutout_from, views, self.draw_cutout(len(views), generator))


class CudaGraphs:
    """make(*tensors) replayed as a CUDA graph, one captured per shape of its CUDA inputs: its few hundred small
    kernels then cost one launch, not a few microseconds of Python each. make must not wait for the host (no .item(),
    no data-dependent shapes). A shape's first call runs make as it is, on a side stream (the warm-up capture asks
    for), its second captures the graph; the outputs of a replay are the graph's own buffers, overwritten by the next
    replay: a training step uses them before then. On the CPU, or where capture fails, make runs as it is."""

    def __init__(self, make):
        self.make, self.graphs = make, {}
        self.__name__ = make.__name__

    def __call__(self, *inputs):
        if not inputs[0].is_cuda or self.graphs is None:
            return self.make(*inputs)
        key = tuple((t.shape, t.stride(), t.dtype, t.device) for t in inputs)
        if key not in self.graphs:  # the first call: a warm-up, whose outputs are the call's
            self.graphs[key] = None
            return self.on_side_stream(inputs)
        if self.graphs[key] is None:
            try:
                self.graphs[key] = self.capture(inputs)
            except RuntimeError as error:
                print(f'warning: {self.__name__} runs without a CUDA graph: {error}', file=sys.stderr)
                self.graphs = None
                return self.make(*inputs)
        graph, static_inputs, outputs = self.graphs[key]
        for buffer, tensor in zip(static_inputs, inputs):
            buffer.copy_(tensor, non_blocking=True)
        graph.replay()
        return outputs

    def on_side_stream(self, inputs):
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = self.make(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        return outputs

    def capture(self, inputs):
        static_inputs = [t.clone() for t in inputs]  # clone keeps the layout (channels_last stays channels_last)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.make(*static_inputs)
        return graph, static_inputs, outputs


def reflect(index, size):
    """Reflect padding's source index (the edge pixel not repeated): -1 -> 1, size -> size - 2."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


# RandAugment's geometric operations: one affine warp


def affine_matrices(op, magnitude, names, h, w):
    """The matrix torchvision's v2.functional uses for each image's operation names[op[i]] at magnitude[i], called as
    RandAugment calls it: affine(shear=degrees(atan(m)), center=[0, 0]) for ShearX/Y (m pixels across per pixel
    down, about the top-left corner), affine(translate=int(m)) for TranslateX/Y, rotate(m) for Rotate; the identity
    for the other operations. Tensor operations only, on the device of op: a CUDA graph can hold them."""
    def only(*ops):  # which images drew one of ops
        return sum(op == names.index(name) for name in ops).bool()
    zero = torch.zeros_like(magnitude)
    shear, offset = torch.rad2deg(torch.atan(magnitude)), magnitude.trunc()
    shearing = only('ShearX', 'ShearY')  # about the top-left corner, (-w/2, -h/2) from the image centre
    return inverse_affine(
        angle=torch.where(only('Rotate'), -magnitude, zero),  # rotate() turns counter-clockwise, affine() clockwise
        translate=torch.stack([torch.where(only('TranslateX'), offset, zero),
                               torch.where(only('TranslateY'), offset, zero)], 1),
        shear=torch.stack([torch.where(only('ShearX'), shear, zero), torch.where(only('ShearY'), shear, zero)], 1),
        center=torch.stack([torch.where(shearing, -w / 2, zero), torch.where(shearing, -h / 2, zero)], 1))


def inverse_affine(angle, translate, shear, center):
    """torchvision's _get_inverse_affine_matrix at scale 1, for a batch: angles and shears in degrees (N,), (N, 2),
    translation and centre in pixels from the image centre (N, 2). The forward map is T C R Sy Sx C^-1 (shear,
    rotate about the centre, translate); the (N, 2, 3) result is its inverse C (R Sy Sx)^-1 C^-1 T^-1, which takes
    an output pixel to the input pixel it shows."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear[:, 0]), torch.deg2rad(shear[:, 1])
    a = torch.cos(rot - sy) / torch.cos(sy)  # R Sy Sx = [[a, b], [c, d]], determinant 1
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    (cx, cy), (x, y) = center.unbind(1), (center + translate).unbind(1)
    return torch.stack([torch.stack([d, -b, cx - d * x + b * y], 1),
                        torch.stack([-c, a, cy + c * x - a * y], 1)], 1)


def warp(images, matrices):
    """Image i resampled through matrices[i] (nearest neighbour, 0 outside), as v2.functional.affine does for one
    image: each output pixel centre, in coordinates from the image centre, mapped by the matrix and scaled to
    grid_sample's [-1, 1]."""
    n, c, h, w = images.shape
    x = torch.linspace((1 - w) / 2, (w - 1) / 2, w, device=images.device).view(1, 1, w)
    y = torch.linspace((1 - h) / 2, (h - 1) / 2, h, device=images.device).view(1, h, 1)
    matrices = matrices.to(torch.float32)
    theta = torch.stack([matrices[:, 0] / (w / 2), matrices[:, 1] / (h / 2)], 1).view(n, 2, 3, 1, 1)
    grid = torch.stack([x * theta[:, k, 0] + y * theta[:, k, 1] + theta[:, k, 2] for k in range(2)], -1)
    resampled = F.grid_sample(images.to(torch.float32), grid, mode='nearest', padding_mode='zeros',
                              align_corners=False)
    return resampled.round_().to(torch.uint8)


# RandAugment's colour operations: (uint8 images (n, 3, H, W), per-image magnitude (n, 1, 1, 1)) -> uint8 images


def blend(images, other, factor):
    """PIL's ImageEnhance: factor 1 is the image, 0 is `other` (grey, the mean, a blur), beyond 1 extrapolates."""
    # images f + other (1 - f), summed as torchvision's add(alpha=) sums it: the same truncation to uint8
    return torch.addcmul(images * factor, other, 1 - factor).clamp_(0, 255).to(torch.uint8)


def luma(images):
    """ITU-R 601 grey, floored to the integers a uint8 grey image would hold."""
    r, g, b = images.to(torch.float32).unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_()[:, None]  # as torchvision sums it


def sharpness(images, factor):
    """Blend with the image smoothed by PIL's SMOOTH kernel (1 around a centre of 5, over 13); the one-pixel border
    stays as it is. The sums are of integers, so any order of summing gives torchvision's rounded result."""
    out = images.to(torch.float32)
    inner = out[..., 1:-1, 1:-1]
    rows = out[..., :-2, :] + out[..., 1:-1, :] + out[..., 2:, :]  # the 3x3 box sums, a row then a column at a time
    smooth = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(inner, alpha=4).div_(13)
    inner.addcmul_(smooth.round_() - inner, 1 - factor)  # blend(inner, smooth, factor), in place
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(images, bits):
    """Keep the `bits` high bits of every channel."""
    mask = (255 << (8 - bits.to(torch.int32))) & 255
    return images & mask.to(torch.uint8)


def autocontrast(images):
    """Each channel of each image stretched to 0..255, (x - min) * 255 / (max - min), as torchvision computes it; a
    flat channel stays as it is. torch.where, not torchvision's masked assignment, so that nothing waits for the
    host."""
    x = images.to(torch.float32)
    low, high = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    return x.sub_(torch.where(flat, 0.0, low)).div_(scale).clamp_(0, 255).to(torch.uint8)


COLOUR_OPS = {
    'Brightness': lambda x, m: (x * (1 + m)).clamp_(0, 255).to(torch.uint8),
    'Color': lambda x, m: blend(x, luma(x), 1 + m),
    'Contrast': lambda x, m: blend(x, luma(x).mean((1, 2, 3), keepdim=True), 1 + m),
    'Sharpness': lambda x, m: sharpness(x, 1 + m),
    'Posterize': posterize,
    'Solarize': lambda x, m: torch.where(x >= 255 * m, 255 - x, x),  # invert the pixels at or above the threshold
    'AutoContrast': lambda x, m: autocontrast(x),
    # parameter-free, and torchvision's kernel already works image by image (and channel by channel) on a batch
    'Equalize': lambda x, m: v2.functional.equalize(x),
}


# -----------------------------------------------------------------------------
# datasets


class UnreadableImage(RuntimeError):
    """Images a run cannot do without cannot be read. Raised in a loader worker, it reaches the training process
    raised again by the DataLoader, the worker's traceback before its message: str() gives the message alone."""

    def __str__(self):
        text, raised_as = super().__str__(), f'{type(self).__module__}.{type(self).__qualname__}: '
        if 'Original Traceback' not in text or raised_as not in text:
            return text
        return text[text.rfind(raised_as) + len(raised_as):].strip()  # after the traceback's 'data.UnreadableImage: '


class LabeledSet(Dataset):
    """items[i] is an image source for open_image, labels[i] its class index into classes. Returns (uint8 image,
    label)."""

    def __init__(self, items, labels, classes, name, skipped=None):
        self.items, self.labels, self.classes, self.name = items, labels, classes, name
        self.skipped = skipped or {}  # reason -> count, for `python data.py` and the logs
        self.decode = None  # set by the user of the set: a Decode

    def __len__(self):
        return len(self.items)

    def read(self, index):
        try:
            return formats.open_image(self.items[index])
        except (OSError, ValueError) as error:
            raise UnreadableImage(f'{self.name}: cannot read image {self.items[index]}: {error}; a labeled set needs '
                                  'every image: replace or remove it') from None

    def __getitem__(self, index):
        return self.decode(self.read(index)), self.labels[index]


def load_labeled(root, split, fmt=None):
    """The `split` ('train', 'val' or 'test') of the labeled set at root, in any format formats.py reads."""
    return LabeledSet(**formats.read_labeled(root, split, fmt))


class UnlabeledPool(Dataset):
    """The pools of one or more --unlabeled sources (open_pool) under one global index, so per-sample state
    (FlexMatch's memory) has one slot per image. Returns (uint8 image, index, skipped). An unreadable, truncated or
    non-image file is replaced by the next readable one and counted in `skipped`, so one bad file in a million never
    stops training."""

    def __init__(self, sources, decode):
        self.sources, self.decode = list(sources), decode
        self.ends = list(itertools.accumulate(len(s) for s in self.sources))  # source k: [ends[k-1], ends[k])

    def __len__(self):
        return self.ends[-1] if self.ends else 0

    def locate(self, i):
        k = bisect.bisect_right(self.ends, i)
        return self.sources[k], i - (self.ends[k - 1] if k else 0)

    def read(self, i):
        """Image i decoded, or None (with a warning) when its file is not a readable image."""
        source, j = self.locate(i)
        try:
            return self.decode(source.read(j))
        except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, EOFError... on bad files
            print(f'warning: skipping unreadable image {source.name(j)}: {error}', file=sys.stderr)
            return None

    def __getitem__(self, index):
        for skipped in range(100):
            i = (index + skipped) % len(self)
            image = self.read(i)
            if image is not None:
                return image, i, skipped
        source, j = self.locate(index)
        raise UnreadableImage(f'100 unreadable images in a row in the unlabeled pool, from {source.name(j)}')


# -----------------------------------------------------------------------------
# samplers and loaders


class InfiniteSampler(Sampler):
    """An endless stream of indices: epoch e is a permutation drawn from (seed, e), or with `weights` a weighted
    draw with replacement (class-balanced sampling). Rank r of `world` takes stream positions r, r + world, ... so
    ranks see different samples; `start` skips this rank's first `start` samples (resume)."""

    def __init__(self, size, seed, rank=0, world=1, start=0, weights=None):
        self.size, self.seed, self.rank, self.world, self.start, self.weights = size, seed, rank, world, start, weights

    def epoch_order(self, epoch):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.weights is None:
            return torch.randperm(self.size, generator=generator).tolist()
        return torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()

    def __iter__(self):
        position, epoch, order = self.start * self.world + self.rank, -1, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = self.epoch_order(epoch)
            yield order[position % self.size]
            position += self.world


def class_balanced_weights(labels, num_classes):
    counts = torch.bincount(torch.tensor(labels), minlength=num_classes).float()
    return (1.0 / counts.clamp(min=1))[torch.tensor(labels)]


# The cores this process may run on, read at import. A loader worker inherits the binding of the thread it is forked
# from: where a runtime binds the training thread, or a forked child, to one core after that, every worker would
# decode on that one core, so each worker takes back these cores (on_cores). A binding made before, by OMP_PROC_BIND,
# GOMP_CPU_AFFINITY (at `import torch`) or taskset, is the user's: train.py only warns of it.
CORES = os.sched_getaffinity(0) if hasattr(os, 'sched_getaffinity') else None


def on_cores(cores, worker_id):
    """A loader worker's first act: run on `cores`, the training process's (CORES there; a worker started by spawn
    imports this module again, under the binding it inherited)."""
    with contextlib.suppress(OSError):  # cores taken away since
        os.sched_setaffinity(0, cores)


def default_workers(cuda, share=1.0):
    """Processes for a loader that decodes `share` of the images of a step, when --workers is not given. On the CPU
    the workers share the cores with the step: 2. On a GPU the cores only feed it, reading and decoding files: that
    share of the cores but one (the training process's), per process under torchrun, and at least 2."""
    if not cuda:
        return 2
    cores = (len(CORES) if CORES else os.cpu_count() or 2) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    return max(2, round((cores - 1) * share))


def loader(dataset, batch_size, sampler=None, workers=2, collate_fn=None):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      drop_last=sampler is not None, persistent_workers=workers > 0 and sampler is not None,
                      prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=functools.partial(on_cores, CORES) if CORES else None)


class InMemory(Dataset):
    """A labeled set or pool decoded once: `columns` are the tensors its source returns, (images, labels) for a
    labeled set, (images, index, skipped) for a pool, `images` one uint8 tensor (N, 3, S, S) on the CPU or the
    training device. Item i is what the source's item i is (a pool's unreadable images, counted in `unreadable`,
    replaced by the next readable ones), so a sampler draws the same batches from either."""

    def __init__(self, columns, unreadable=0, classes=None, name='unlabeled pool'):
        self.columns, self.unreadable, self.classes, self.name = columns, unreadable, classes, name
        self.images = columns[0]
        self.labels = columns[1].tolist() if classes is not None else None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return tuple(column[index] for column in self.columns)


class Readable(Dataset):
    """What in_memory decodes: (image, label) of a labeled set; (image or None,) of a pool, an unreadable image
    not replaced by the next one."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (self.dataset.read(i),) if isinstance(self.dataset, UnlabeledPool) else self.dataset[i]


def stack_readable(samples):
    """Collate in the worker: (the readable samples stacked, or None; which samples were readable)."""
    readable = [s for s in samples if s[0] is not None]
    return (default_collate(readable) if readable else None), torch.tensor([s[0] is not None for s in samples])


def in_memory(dataset, workers=2, device='cpu'):
    """Decode every image of a LabeledSet or UnlabeledPool once, through `workers` processes, into one uint8 tensor:
    the images of a run are then decoded once, not once an epoch. A 48 px face takes 7 kB (3 channels, even grey).
    In a pool an unreadable image is replaced by the next readable one, as UnlabeledPool does, with its index and
    the count skipped: the same items, so streamed and in-memory runs draw the same batches."""
    pool, images, labels, was_readable, start = isinstance(dataset, UnlabeledPool), None, [], [], 0
    for readable, mask in loader(Readable(dataset), 256, workers=workers, collate_fn=stack_readable):
        if readable is not None:
            if images is None:  # one image's size is known now: place the whole tensor
                images = empty_images((len(dataset), *readable[0].shape[1:]), torch.device(device))
            at = start + mask.nonzero().flatten()  # each readable image in its own place
            images.index_copy_(0, at.to(images.device), readable[0].to(images.device))
            labels += readable[1:]
        was_readable.append(mask)
        start += len(mask)
    if images is None:
        raise UnreadableImage(f'{dataset.name if not pool else "the unlabeled pool"}: no readable image')
    if not pool:
        return InMemory((images, torch.cat(labels).to(images.device)), 0, dataset.classes, dataset.name)
    readable = torch.cat(was_readable)
    index = next_readable(readable)
    skipped = (index - torch.arange(len(index))) % len(index)
    if skipped.max() >= 100:
        source, j = dataset.locate(int(skipped.argmax()))
        raise UnreadableImage(f'100 unreadable images in a row in the unlabeled pool, from {source.name(j)}')
    unreadable = int((~readable).sum())
    if unreadable:
        images[~readable.to(images.device)] = images[index[~readable].to(images.device)]
        print(f'warning: {unreadable} unreadable images in the unlabeled pool, each replaced by the next readable one',
              file=sys.stderr)
    return InMemory((images, index.to(images.device), skipped.to(images.device)), unreadable)


def next_readable(readable):
    """For each position of a pool, the first readable one at or after it, wrapping around past the end: where
    UnlabeledPool.__getitem__ finds its image."""
    n = len(readable)
    positions = torch.arange(2 * n)  # the pool twice over, for the wrap
    ahead = torch.where(readable.repeat(2), positions, 2 * n)
    return ahead.flip(0).cummin(0).values.flip(0)[:n] % n  # the least readable position at or after each


def worth_keeping(images, img_size, device):
    """--in-memory auto: keep a set of `images` decoded on a GPU when they take at most a quarter of its free memory.
    There loader workers decoding every epoch cannot keep up with the step (README, Performance); on the CPU they can,
    and streaming saves the memory."""
    device = torch.device(device)
    return device.type == 'cuda' and images * 3 * img_size ** 2 <= torch.cuda.mem_get_info(device)[0] // 4


def empty_images(shape, device):
    """An uninitialised uint8 tensor on `device` when it fits in half its free memory (the other half for the
    model), else in the CPU's, pinned when `device` is a GPU so that batches copy to it asynchronously."""
    if device.type != 'cuda':
        return torch.empty(shape, dtype=torch.uint8)
    if math.prod(shape) < torch.cuda.mem_get_info(device)[0] // 2:
        return torch.empty(shape, dtype=torch.uint8, device=device)
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True)


def batches(dataset, batch_size, sampler, workers=2, device='cpu'):
    """An endless stream of batches, tuples of tensors already on `device`, in the order of `sampler` (an
    InfiniteSampler). An InMemory dataset is indexed directly (on its device, or through pinned memory); any other
    one streams through `workers` loader processes. On CUDA each batch is pinned here, in the training loop's thread,
    and copied asynchronously: not in a pinning thread of the loader's, whose pinning while the loop captures a CUDA
    graph (CudaGraphs) would break the capture."""
    device = torch.device(device)
    cuda = device.type == 'cuda'

    def to_device(batch):  # pinned: a copy from pageable memory would wait for the GPU to finish its queue
        return tuple((t.pin_memory() if cuda else t).to(device, non_blocking=True) for t in batch)
    if isinstance(dataset, InMemory):
        indices = iter(sampler)
        while True:
            index = torch.tensor(list(itertools.islice(indices, batch_size)))
            yield dataset[to_device([index])[0]] if dataset.images.is_cuda else to_device(dataset[index])
    for batch in loader(dataset, batch_size, sampler, workers):
        yield to_device(batch)


# -----------------------------------------------------------------------------
# python data.py PATH [PATH ...] [--json]: what a dataset holds, before training on it


CHECK_UP_TO = 20_000  # pools up to this size are read in full by `python data.py`; --check-all reads any


class PoolCheck(Dataset):
    """Reads image i of a pool: '' when it opens as an image, else why not (the reason without the file's name or
    numbers, so that files failing alike are counted together)."""

    def __init__(self, pool):
        self.pool = pool

    def __len__(self):
        return len(self.pool)

    def __getitem__(self, i):
        try:
            self.pool.read(i)
            return i, ''
        except Exception as error:
            message = re.sub(r"'[^']*'|\"[^\"]*\"|<[^>]*>", '', str(error).replace(self.pool.name(i), ''))
            return i, f'{type(error).__name__}: {" ".join(re.sub(r"[0-9]+", "N", message).split())}'


def check_pool(pool, workers):
    """(readable count, {reason: count}, {reason: first file}) after reading every image of pool."""
    reasons, examples = Counter(), {}
    for batch in loader(PoolCheck(pool), 64, workers=workers, collate_fn=list):
        for i, reason in batch:
            if reason:
                reasons[reason] += 1
                examples.setdefault(reason, pool.name(i))
    return len(pool) - sum(reasons.values()), dict(reasons), examples


def describe(path, fmt=None, check_all=False, workers=0):
    """A dict of what path holds: the labeled format and, per split, images per class and what was skipped and
    why; or, for a path in no labeled format, the unlabeled pool it is: its size and, read in full when it holds up
    to CHECK_UP_TO images or with check_all, how many open as images and why the others do not."""
    try:
        fmt = fmt or formats.detect_format(path)
    except (OSError, ValueError) as error:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # indexing a folder pool reports on stdout: keep --json clean
                pool = pools.open_pool(path)
        except (OSError, ValueError):
            return dict(path=path, error=str(error))
        found = dict(path=path, format='unlabeled', images=len(pool), checked=check_all or len(pool) <= CHECK_UP_TO)
        if found['checked']:
            found['readable'], found['unreadable'], found['examples'] = check_pool(pool, workers)
        return found
    splits = {}
    for split in formats.SPLITS[fmt]:
        if fmt == 'imagefolder' and not os.path.isdir(os.path.join(path, split)):
            continue  # an ImageFolder set has the splits it has folders for
        try:
            labeled = load_labeled(path, split, fmt)
        except (OSError, ValueError) as error:
            splits[split] = dict(error=str(error))
            continue
        counts = Counter(labeled.labels)
        splits[split] = dict(images=len(labeled), source=labeled.name, skipped=labeled.skipped,
                             classes={name: counts[i] for i, name in enumerate(labeled.classes)})
    return dict(path=path, format=fmt, splits=splits)


def describe_text(found):
    if 'error' in found:  # the reader's messages mostly start with the path already
        error = found['error']
        return error if error.startswith(found['path']) else f'{found["path"]}: {error}'
    if found['format'] == 'unlabeled':
        line = f'{found["path"]}: unlabeled pool of {found["images"]} images'
        if not found['checked']:
            return f'{line}; not read (over {CHECK_UP_TO}: --check-all reads every image)'
        lines = [f'{line}; all read: {found["readable"]} open as images, {found["images"] - found["readable"]} '
                 f'do not']
        lines.extend(f'    {n}: {reason} (e.g. {found["examples"][reason]})' for reason, n in found['unreadable'].items())
        return '\n'.join(lines)
    lines = [f'{found["path"]}: {found["format"]}']
    for split, s in found['splits'].items():
        if 'error' in s:
            lines.append(f'  {split}: error: {s["error"]}')
            continue
        lines.append(f'  {split}: {s["images"]} images from {s["source"]}')
        lines.append('    ' + ', '.join(f'{name} {n}' for name, n in s['classes'].items()))
        lines.extend(f'    skipped {n}: {reason}' for reason, n in s['skipped'].items())
    return '\n'.join(lines)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='With no PATH, generate the built-in face set into data/faces. '
                                     'With PATHs, show what each holds: the detected format, images per class and '
                                     'split, and what was skipped and why; or, for an unlabeled pool, its size and '
                                     'how many of its files open as images.')
    parser.add_argument('paths', nargs='*', metavar='PATH', help='labeled set roots, CSV files or unlabeled pools')
    parser.add_argument('--format', choices=formats.FORMATS, help='labeled format (default: detected from each PATH)')
    parser.add_argument('--check-all', action='store_true',
                        help=f'read every image of an unlabeled pool, however large (default: pools up to '
                             f'{CHECK_UP_TO} images)')
    parser.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                        help='processes reading a pool (default: the cores, at most 8)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of text')
    args = parser.parse_args()
    if not args.paths:
        faces.default_data()
    else:
        found = [describe(path, args.format, args.check_all, args.workers) for path in args.paths]
        if args.json:
            print(json.dumps(found, indent=1))
        else:
            for f in found:  # a path that cannot be read: its one line on stderr
                print(describe_text(f), file=sys.stderr if 'error' in f else sys.stdout)
        # exit status 1 when a path or a split could not be read, for scripts
        sys.exit(any('error' in f or any('error' in s for s in f.get('splits', {}).values()) for f in found))
