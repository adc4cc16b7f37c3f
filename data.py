"""
Data: labeled sets and unlabeled pools decoded to uint8 tensors, endless sampled batch streams, and FixMatch's weak
and strong views of whole batches.

Where the images come from is sources/ (formats.py: labeled sets as their owners ship them; pools.py: unlabeled
faces; faces.py: the built-in faces; datasets.py: both as torch Datasets). Loader workers only read and decode
(Decode); the step makes the views of each batch (Augment), every random parameter drawn per image from a generator
the step seeds, so a resumed run makes the same views. On a GPU, fast/ makes the same views and batches, faster.
`python tools/inspect_data.py PATH` shows what a dataset holds before you train on it.
"""
import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import v2

from sources.datasets import LabeledSet, UnlabeledPool, UnreadableImage, load_labeled  # noqa: F401

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class Decode:
    """PIL image -> uint8 tensor (3, img_size, img_size). grey=True turns every image grey (3 equal channels): a model
    trained on grey labeled faces (FER2013) never sees colour, so colour unlabeled faces (LFW) would lie outside its
    domain."""

    def __init__(self, img_size, grey=False):
        self.size, self.grey = img_size, grey
        self.resize = v2.Resize((img_size, img_size), antialias=True)

    def __call__(self, image):
        return self.finish(v2.functional.pil_to_tensor(image))

    def finish(self, image):
        """A decoded uint8 RGB tensor, on any device, to the training size (and grey)."""
        if self.grey:  # ITU-R 601 luma, as PIL's convert('L')
            image = v2.functional.rgb_to_grayscale(image, num_output_channels=3)
        return image if image.shape[-2:] == (self.size, self.size) else self.resize(image)


def normalize(images):
    """uint8 images (N, 3, H, W) -> float32: ToDtype(float32, scale=True) then Normalize(MEAN, STD)."""
    x = images.to(torch.float32).div_(255)
    for channel, (mean, std) in enumerate(zip(MEAN, STD)):
        x[:, channel].sub_(mean).div_(std)
    return x


# -----------------------------------------------------------------------------
# RandAugment's 14 operations, each a batch function (uint8 images (n, 3, H, W), magnitude (n,)) -> uint8 images that
# does to every image what torchvision's v2.RandAugment does to one (tests/test_augment.py holds them to it)

def identity(images, m):
    return images


def shear_x(images, m):  # affine(shear=[degrees(atan(m)), 0], center=[0, 0]): about the top-left corner
    return warp(images, affine_matrix(images, m, shear_x=torch.rad2deg(torch.atan(m)), about_corner=True))


def shear_y(images, m):
    return warp(images, affine_matrix(images, m, shear_y=torch.rad2deg(torch.atan(m)), about_corner=True))


def translate_x(images, m):  # affine(translate=[int(m), 0])
    return warp(images, affine_matrix(images, m, translate_x=m.trunc()))


def translate_y(images, m):
    return warp(images, affine_matrix(images, m, translate_y=m.trunc()))


def rotate(images, m):  # rotate(m) turns counter-clockwise, affine(angle) clockwise
    return warp(images, affine_matrix(images, m, angle=-m))


def brightness(images, m):
    return (images * (1 + per_image(m))).clamp_(0, 255).to(torch.uint8)


def color(images, m):
    return blend(images, luma(images), 1 + per_image(m))


def contrast(images, m):
    return blend(images, luma(images).mean((1, 2, 3), keepdim=True), 1 + per_image(m))


def sharpness(images, m):
    """Blend with the image smoothed by PIL's SMOOTH kernel (1 around a centre of 5, over 13); the one-pixel border
    stays as it is. The sums are of integers, so any order of summing gives torchvision's rounded result."""
    out = images.to(torch.float32)
    inner = out[..., 1:-1, 1:-1]
    rows = out[..., :-2, :] + out[..., 1:-1, :] + out[..., 2:, :]  # the 3x3 box sums, a row then a column at a time
    smooth = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(inner, alpha=4).div_(13)
    inner.addcmul_(smooth.round_() - inner, 1 - (1 + per_image(m)))  # blend(inner, smooth, 1 + m), in place
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(images, m):  # keep the m high bits of every channel
    mask = (255 << (8 - per_image(m).to(torch.int32))) & 255
    return images & mask.to(torch.uint8)


def solarize(images, m):  # invert the pixels at or above 255 m
    return torch.where(images >= 255 * per_image(m), 255 - images, images)


def autocontrast(images, m):
    """Each channel stretched to 0..255, (x - min) * 255 / (max - min), as torchvision computes it; a flat channel
    stays as it is."""
    x = images.to(torch.float32)
    low, high = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    return x.sub_(torch.where(flat, 0.0, low)).div_(scale).clamp_(0, 255).to(torch.uint8)


def equalize(images, m):  # torchvision's kernel already works image by image on a batch
    return v2.functional.equalize(images)


# in v2.RandAugment's order: name -> (operation, its magnitudes over the 31 bins for an image of `size`, signed)
RANDAUGMENT = {
    'Identity': (identity, lambda size: torch.zeros(31), False),
    'ShearX': (shear_x, lambda size: torch.linspace(0.0, 0.3, 31), True),
    'ShearY': (shear_y, lambda size: torch.linspace(0.0, 0.3, 31), True),
    'TranslateX': (translate_x, lambda size: torch.linspace(0.0, 150.0 / 331.0 * size, 31), True),
    'TranslateY': (translate_y, lambda size: torch.linspace(0.0, 150.0 / 331.0 * size, 31), True),
    'Rotate': (rotate, lambda size: torch.linspace(0.0, 30.0, 31), True),
    'Brightness': (brightness, lambda size: torch.linspace(0.0, 0.9, 31), True),
    'Color': (color, lambda size: torch.linspace(0.0, 0.9, 31), True),
    'Contrast': (contrast, lambda size: torch.linspace(0.0, 0.9, 31), True),
    'Sharpness': (sharpness, lambda size: torch.linspace(0.0, 0.9, 31), True),
    'Posterize': (posterize, lambda size: (8 - (torch.arange(31) / ((31 - 1) / 4))).round().int(), False),
    'Solarize': (solarize, lambda size: torch.linspace(1.0, 0.0, 31), False),
    'AutoContrast': (autocontrast, lambda size: torch.zeros(31), False),
    'Equalize': (equalize, lambda size: torch.zeros(31), False),
}


def per_image(m):
    """A magnitude per image (n,), as float32 (n, 1, 1, 1): broadcast over each image's pixels."""
    return m.to(torch.float32).view(-1, 1, 1, 1)


def blend(images, other, factor):
    """PIL's ImageEnhance: factor 1 is the image, 0 is `other` (grey, the mean), beyond 1 extrapolates; summed as
    torchvision's add(alpha=) sums it, so it truncates to uint8 the same way."""
    return torch.addcmul(images * factor, other, 1 - factor).clamp_(0, 255).to(torch.uint8)


def luma(images):
    """ITU-R 601 grey, floored to the integers a uint8 grey image would hold."""
    r, g, b = images.to(torch.float32).unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_()[:, None]  # as torchvision sums it


def affine_matrix(images, m, angle=None, translate_x=None, translate_y=None, shear_x=None, shear_y=None,
                  about_corner=False):
    """torchvision's _get_inverse_affine_matrix at scale 1, per image (each argument (n,), None for 0): angles and
    shears in degrees, translation in pixels. The forward map is T C R Sy Sx C^-1 (shear, rotate about the centre C,
    translate); the (n, 2, 3) result is its inverse, which takes an output pixel to the input pixel it shows. C is
    the image centre, or with about_corner its top-left corner, (-w/2, -h/2) from the centre."""
    h, w = images.shape[-2:]
    zero = torch.zeros_like(m)
    angle, tx, ty, sx, sy = (zero if v is None else v for v in (angle, translate_x, translate_y, shear_x, shear_y))
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(sx), torch.deg2rad(sy)
    a = torch.cos(rot - sy) / torch.cos(sy)  # R Sy Sx = [[a, b], [c, d]], determinant 1
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    cx, cy = (torch.full_like(m, -w / 2), torch.full_like(m, -h / 2)) if about_corner else (zero, zero)
    x, y = cx + tx, cy + ty
    return torch.stack([torch.stack([d, -b, cx - d * x + b * y], 1), torch.stack([-c, a, cy + c * x - a * y], 1)], 1)


def warp(images, matrices):
    """Image i resampled through matrices[i] (nearest neighbour, 0 outside), as v2.functional.affine does for one
    image: each output pixel centre, in coordinates from the image centre, mapped by the matrix and scaled to
    grid_sample's [-1, 1]."""
    n, _, h, w = images.shape
    x = torch.linspace((1 - w) / 2, (w - 1) / 2, w, device=images.device).view(1, 1, w)
    y = torch.linspace((1 - h) / 2, (h - 1) / 2, h, device=images.device).view(1, h, 1)
    matrices = matrices.to(torch.float32)
    theta = torch.stack([matrices[:, 0] / (w / 2), matrices[:, 1] / (h / 2)], 1).view(n, 2, 3, 1, 1)
    grid = torch.stack([x * theta[:, k, 0] + y * theta[:, k, 1] + theta[:, k, 2] for k in range(2)], -1)
    resampled = F.grid_sample(images.to(torch.float32), grid, mode='nearest', padding_mode='zeros',
                              align_corners=False)
    return resampled.round_().to(torch.uint8)


# -----------------------------------------------------------------------------
# the views


class Augment:
    """FixMatch's views of uint8 batches (N, 3, S, S), each image with its own parameters:
        weak    RandomHorizontalFlip + RandomCrop(S, padding=S // 8, padding_mode='reflect')
        strong  weak + RandAugment(num_ops=2, magnitude=10 of its 0..30, fill 0), as torchvision's v2.RandAugment
        cutout  RandomErasing(p=1, scale=(0.02, 0.15), ratio=(0.3, 3.3), value=0), on the normalised strong view
    The parameters are drawn on the CPU from the `generator` passed in: a batch's views are a function of its seed."""

    def __init__(self, img_size, num_ops=2, magnitude=10):
        self.size, self.pad, self.num_ops = img_size, img_size // 8, num_ops
        self.names, self.operations = list(RANDAUGMENT), [op for op, _, _ in RANDAUGMENT.values()]
        self.magnitudes = torch.tensor([float(bins(img_size)[magnitude]) for _, bins, _ in RANDAUGMENT.values()],
                                       dtype=torch.float64)
        self.signed = torch.tensor([signed for _, _, signed in RANDAUGMENT.values()])

    def labeled_view(self, images, generator):
        return normalize(self.weak(images, generator))

    def unlabeled_views(self, images, generator):
        """(weak, strong), normalised, from the same images, each with its own draws."""
        return self.views_from(images, *self.draw_unlabeled(len(images), generator))

    def views_from(self, images, weak, strong, rounds, box):
        """The two views of each image: its weak view; and its strong view, another weak view, then its RandAugment
        rounds, normalised, then its Cutout box."""
        strong_view = self.weak_from(images, strong)
        for op, magnitude in rounds:
            strong_view = self.apply(strong_view, op, magnitude)
        return normalize(self.weak_from(images, weak)), self.cutout_from(normalize(strong_view), box)

    def weak(self, images, generator):
        return self.weak_from(images, self.draw_weak(len(images), generator))

    def randaugment(self, images, generator):
        for _ in range(self.num_ops):
            images = self.apply(images, *self.draw_round(len(images), generator))
        return images

    def apply(self, images, op, magnitude):
        """Image i through operation op[i] at magnitude[i]: each operation on the images that drew it."""
        out, magnitude = images.clone(), magnitude.to(images.device)
        for k, operation in enumerate(self.operations):
            chosen = (op == k).nonzero().flatten().to(images.device)
            if len(chosen):
                out[chosen] = operation(images[chosen], magnitude[chosen])
        return out

    def cutout(self, views, generator):
        return self.cutout_from(views, self.draw_cutout(len(views), generator))

    # the draws, on the CPU, one row per image

    def draw_unlabeled(self, n, generator):
        """The parameters of both unlabeled views: (weak, strong's weak part, its RandAugment rounds, its box)."""
        weak, strong = self.draw_weak(n, generator), self.draw_weak(n, generator)
        rounds = [self.draw_round(n, generator) for _ in range(self.num_ops)]
        return weak, strong, rounds, self.draw_cutout(n, generator)

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

    # the views from their parameters

    def weak_from(self, images, weak):
        """The flip and the translation choose source pixels: row y of the view is row reflect(y + top - pad) of the
        image, column x is column reflect(x + left - pad), mirrored (S - 1 - column) if flipped."""
        n, s = len(images), self.size
        flip, top, left = weak.long().to(images.device).unbind(1)
        pixels = torch.arange(s, device=images.device)
        rows = reflect(pixels + top[:, None] - self.pad, s)
        cols = reflect(pixels + left[:, None] - self.pad, s)
        cols = torch.where(flip[:, None] == 1, s - 1 - cols, cols)
        source = (rows[:, :, None] * s + cols[:, None, :]).view(n, 1, s * s)  # flat pixel index
        return images.flatten(2).gather(2, source.expand(n, 3, s * s)).view(n, 3, s, s)

    def cutout_from(self, views, box):
        top, left, h, w = box.long().to(views.device)[:, :, None].unbind(1)
        pixels = torch.arange(self.size, device=views.device)
        rows, cols = (top <= pixels) & (pixels < top + h), (left <= pixels) & (pixels < left + w)
        return views.masked_fill((rows[:, :, None] & cols[:, None, :])[:, None], 0)


def reflect(index, size):
    """Reflect padding's source index (the edge pixel not repeated): -1 -> 1, size -> size - 2."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


# -----------------------------------------------------------------------------
# samplers and batch streams


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


def loader(dataset, batch_size, sampler=None, workers=2, collate_fn=None, worker_init_fn=None):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      drop_last=sampler is not None, persistent_workers=workers > 0 and sampler is not None,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=worker_init_fn)


def batches(dataset, batch_size, sampler, workers=2, device='cpu'):
    """An endless stream of batches, tuples of tensors on `device`, in the order of `sampler` (an InfiniteSampler),
    read and decoded by `workers` loader processes."""
    for batch in loader(dataset, batch_size, sampler, workers):
        yield tuple(t.to(device) for t in batch)
