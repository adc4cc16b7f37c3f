"""
Tests of the batched augmentation (data.Augment) against torchvision: every RandAugment operation, image by image,
against the call v2.RandAugment makes for it; the distributions of the flip, the translation and the Cutout box
against RandomHorizontalFlip, RandomCrop(padding, reflect) and RandomErasing; per-sample parameters; determinism
from the generator's seed.

    python -m pytest tests/test_augment.py
"""
import math

import pytest
import torch
from torchvision.transforms import v2

import data
from fast.views import GpuAugment

stats = pytest.importorskip('scipy.stats')  # scipy comes with scikit-learn


def faces_like(n, size, seed=0):
    """Smooth random uint8 images (blurred noise): flat and textured regions, like faces, unlike pure noise."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n, 3, size, size), generator=generator).float()
    return torch.nn.functional.avg_pool2d(noise, 5, 1, 2, count_include_pad=False).round().to(torch.uint8)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# RandAugment: the table and each operation


@pytest.mark.parametrize('size', [48, 112])
def test_randaugment_table_is_torchvisions(size):
    """Same operations in the same order, same magnitude at bin 10 of 31, same signed flags."""
    augment = data.Augment(size)
    space = v2.RandAugment._AUGMENTATION_SPACE
    assert augment.names == list(space)
    for name, magnitude, signed in zip(augment.names, augment.magnitudes.tolist(), augment.signed.tolist()):
        magnitudes_fn, their_signed = space[name]
        theirs = magnitudes_fn(31, size, size)
        assert signed == their_signed, name
        assert magnitude == (0.0 if theirs is None else float(theirs[10])), name


# magnitudes per image, signed, over and beyond RandAugment's range; geometric ones avoid the quarter turns, where
# rotate() takes a transpose shortcut
MAGNITUDES = {
    'Identity': [0.0] * 6,
    'ShearX': [-0.3, -0.1, 0.0, 0.05, 0.1, 0.25],
    'ShearY': [-0.3, -0.1, 0.0, 0.05, 0.1, 0.25],
    'TranslateX': [-21.7, -7.25, -0.5, 0.0, 7.25, 15.9],
    'TranslateY': [-21.7, -7.25, -0.5, 0.0, 7.25, 15.9],
    'Rotate': [-30.0, -10.0, -3.3, 0.0, 10.0, 44.9],
    'Brightness': [-0.9, -0.3, 0.0, 0.1, 0.3, 0.9],
    'Color': [-0.9, -0.3, 0.0, 0.1, 0.3, 0.9],
    'Contrast': [-0.9, -0.3, 0.0, 0.1, 0.3, 0.9],
    'Sharpness': [-0.9, -0.3, 0.0, 0.1, 0.3, 0.9],
    'Posterize': [1.0, 2.0, 4.0, 6.0, 7.0, 8.0],
    'Solarize': [0.0, 0.2, 0.5, float(torch.linspace(1.0, 0.0, 31)[10]), 0.9, 1.0],
    'AutoContrast': [0.0] * 6,
    'Equalize': [0.0] * 6,
}


def torchvision_op(image, name, magnitude):
    """What v2.RandAugment.forward does to one image when it draws operation `name` at `magnitude`: its own call
    into v2.functional (affine(shear=degrees(atan(m)), center=[0, 0]), affine(translate=int(m)), rotate(m),
    adjust_brightness(1 + m), ..., posterize(int(m)), solarize(255 m), autocontrast, equalize)."""
    randaugment = v2.RandAugment()
    return randaugment._apply_image_or_video_transform(image, name, magnitude, interpolation=randaugment.interpolation,
                                                       fill=randaugment._fill)


@pytest.mark.parametrize('name', list(MAGNITUDES))
@pytest.mark.parametrize('size', [48, 112])
def test_each_operation_matches_torchvision_image_by_image(name, size):
    """One batch, every image its own magnitude, against torchvision applying the operation to each image alone."""
    augment = data.Augment(size)
    images = faces_like(len(MAGNITUDES[name]), size, seed=size)
    images[-1, :, :size // 3] = 255  # a saturated band: clamping, solarize at the top, equalize's last bin
    magnitude = torch.tensor(MAGNITUDES[name], dtype=torch.float64)
    ours = augment.apply(images, torch.full((len(images),), augment.names.index(name)), magnitude)
    assert ours.dtype == torch.uint8 and ours.shape == images.shape
    for i, m in enumerate(MAGNITUDES[name]):
        theirs = torchvision_op(images[i], name, m)
        difference = (ours[i].int() - theirs.int()).abs()
        # within rounding: a colour a unit off, or a few nearest-neighbour ties resolved the other way
        assert difference.max() <= 1 or (difference > 0).float().mean() < 0.005, (name, m, difference.max())
    if name != 'Identity':
        assert not torch.equal(ours, images)


def test_operations_mix_in_one_batch():
    """Images that drew different operations, geometric and colour together, each get their own."""
    augment = data.Augment(48)
    names = ['Rotate', 'Solarize', 'ShearY', 'Equalize', 'TranslateX', 'Color', 'Identity', 'Posterize']
    op = torch.tensor([augment.names.index(n) for n in names])
    magnitude = torch.tensor([-10.0, 0.5, 0.1, 0.0, 7.25, -0.3, 0.0, 4.0], dtype=torch.float64)
    images = faces_like(len(names), 48, seed=3)
    ours = augment.apply(images, op, magnitude)
    for i, (name, m) in enumerate(zip(names, magnitude.tolist())):
        theirs = torchvision_op(images[i], name, m)
        assert (ours[i].int() - theirs.int()).abs().max() <= 1, name


def test_randaugment_draws_its_operations_and_signs_per_image(monkeypatch):
    """Over the images of one batch: each round picks each of the 14 operations with probability 1/14, a signed
    operation is negated with probability 1/2, the magnitude is the table's."""
    augment, drawn = data.Augment(48), []
    monkeypatch.setattr(augment, 'apply', lambda images, op, magnitude: drawn.append((op, magnitude)) or images)
    augment.randaugment(torch.zeros(7000, 3, 48, 48, dtype=torch.uint8), seeded(0))
    assert len(drawn) == 2  # num_ops rounds
    for op, magnitude in drawn:
        counts = torch.bincount(op, minlength=14)
        assert stats.chisquare(counts.tolist()).pvalue > 0.001  # against uniform
        table = augment.magnitudes[op]
        assert torch.equal(magnitude.abs(), table)
        negated = magnitude[augment.signed[op] & (table != 0)] < 0
        assert abs(negated.float().mean().item() - 0.5) < 4 * 0.5 / math.sqrt(len(negated))
    assert not torch.equal(drawn[0][0], drawn[1][0])  # the rounds draw independently


# -----------------------------------------------------------------------------
# the weak view and Cutout against torchvision's transforms


def coordinates(size):
    """An image whose pixels name themselves: red = row, green = column (so a view tells where each pixel came
    from), blue = 0."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    return torch.stack([rows, cols, torch.zeros_like(rows)]).to(torch.uint8)


def weak_parameters(views, size, pad):
    """(flipped, top, left) of each weak view of coordinates(size): the centre pixel never comes from the padding."""
    c = size // 2
    flipped = views[:, 1, c, c + 1].int() < views[:, 1, c, c].int()
    top = views[:, 0, c, c].long() - c + pad
    left = torch.where(flipped, size - 1 - views[:, 1, c, c].long(), views[:, 1, c, c].long()) - c + pad
    return flipped, top, left


def test_weak_view_is_torchvisions_flip_and_reflect_padded_crop():
    """Each view is exactly hflip (if drawn) + pad(reflect) + crop at its own offsets, and flip, top and left are
    distributed as RandomHorizontalFlip + RandomCrop(S, padding=S // 8, padding_mode='reflect') draw them."""
    size, pad, n = 48, 6, 4000
    image = coordinates(size)
    ours = data.Augment(size).weak(image.expand(n, -1, -1, -1), seeded(0))
    flipped, top, left = weak_parameters(ours, size, pad)
    for i in range(0, n, 200):  # the whole view, padding included, for a sample of them
        source = v2.functional.horizontal_flip(image) if flipped[i] else image
        padded = v2.functional.pad(source, [pad] * 4, padding_mode='reflect')
        assert torch.equal(ours[i], v2.functional.crop(padded, int(top[i]), int(left[i]), size, size)), i
    # torchvision's draws: the flip applied (cheap), RandomCrop's offsets from its make_params (padding is slow)
    torch.manual_seed(0)
    flip, crop = v2.RandomHorizontalFlip(), v2.RandomCrop(size, padding=pad, padding_mode='reflect')
    offsets = torch.tensor([[p['top'], p['left']] for p in (crop.make_params([image]) for _ in range(n))])
    flips = torch.stack([flip(image) for _ in range(n)])[:, 1, 0, 0] == size - 1
    theirs = flips, offsets[:, 0], offsets[:, 1]
    for a, b, values in zip((flipped, top, left), theirs, ([False, True], range(2 * pad + 1), range(2 * pad + 1))):
        table = [[(x == v).sum().item() for v in values] for x in (a, b)]
        assert stats.chi2_contingency(table)[1] > 0.001, table


def test_cutout_draws_the_boxes_of_random_erasing():
    """Box heights, widths and corners distributed as RandomErasing(p=1, scale=(0.02, 0.15), ratio=(0.3, 3.3))."""
    size, n = 48, 3000

    def boxes(erased):
        hole = erased[:, 0] == 0
        rows, cols = hole.any(2), hole.any(1)
        return torch.stack([rows.sum(1), cols.sum(1), rows.int().argmax(1), cols.int().argmax(1)], 1).float()
    ours = boxes(data.Augment(size).cutout(torch.ones(n, 3, size, size), seeded(0)))
    torch.manual_seed(0)
    erase = v2.RandomErasing(p=1.0, scale=(0.02, 0.15), ratio=(0.3, 3.3), value=0)
    theirs = boxes(torch.stack([erase(torch.ones(3, size, size)) for _ in range(n)]))
    assert torch.allclose(ours.mean(0), theirs.mean(0), rtol=0.05)  # ~6 standard errors
    assert torch.allclose(ours.std(0), theirs.std(0), rtol=0.08)
    for k in range(2):  # heights and widths, value by value
        values = sorted(set(ours[:, k].tolist()) | set(theirs[:, k].tolist()))
        table = [[(x[:, k] == v).sum().item() + 1 for v in values] for x in (ours, theirs)]  # +1: no empty cells
        assert stats.chi2_contingency(table)[1] > 0.001


# -----------------------------------------------------------------------------
# the views the training step takes


def test_views_shapes_range_and_per_sample_parameters():
    size, n = 48, 32
    augment = data.Augment(size)
    images = faces_like(1, size).expand(n, -1, -1, -1)  # one face, n times: any difference is the augmentation's
    labeled = augment.labeled_view(images, seeded(0))
    weak, strong = augment.unlabeled_views(images, seeded(1))
    for view in (labeled, weak, strong):
        assert view.shape == (n, 3, size, size) and view.dtype == torch.float32
        assert view.min() >= -1 and view.max() <= 1
    assert len({tuple(view.flatten().tolist()) for view in weak}) > n // 2  # 338 (flip, top, left) outcomes
    assert len({tuple(view.flatten().tolist()) for view in strong}) == n
    assert all((view == 0).all(0).sum() >= 0.02 * size * size for view in strong)  # each has its Cutout box
    assert not torch.equal(weak, strong)


def test_same_seed_same_views_other_seed_other_views():
    augment, images = data.Augment(48), faces_like(16, 48)
    first = augment.unlabeled_views(images, seeded(7))
    again = augment.unlabeled_views(images, seeded(7))
    other = augment.unlabeled_views(images, seeded(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    assert torch.equal(augment.labeled_view(images, seeded(7)), augment.labeled_view(images, seeded(7)))
    rng = torch.get_rng_state()
    augment.unlabeled_views(images, seeded(7))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone


def test_grey_stays_grey():
    images = faces_like(64, 48)[:, :1].expand(-1, 3, -1, -1)
    for view in data.Augment(48).unlabeled_views(images, seeded(0)):
        assert torch.equal(view[:, 0], view[:, 1]) and torch.equal(view[:, 1], view[:, 2])


def test_normalize_is_todtype_then_normalize():
    images = faces_like(4, 16)
    theirs = v2.Normalize(data.MEAN, data.STD)(v2.ToDtype(torch.float32, scale=True)(images))
    assert torch.allclose(data.normalize(images), theirs, atol=1e-6)
    assert data.normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)).eq(1).all()
    assert data.normalize(torch.zeros(1, 3, 2, 2, dtype=torch.uint8)).eq(-1).all()


def test_every_image_through_every_operation_gives_the_same_views():
    """The GPU's way (every image through all 14 operations, keeping the one it drew) and the CPU's (each image
    through its own) are the same views, bit for bit."""
    images = faces_like(64, 48, seed=4)
    images[:8, :, :20] = 255  # saturated bands: solarize, equalize's last bin, autocontrast's flat channels
    images[8:12] = 77  # flat images
    for seed in range(3):
        every = GpuAugment(48).unlabeled_views(images, seeded(seed))
        own = data.Augment(48).unlabeled_views(images, seeded(seed))
        assert all(torch.equal(a, b) for a, b in zip(every, own))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no GPU')
def test_gpu_views_replayed_as_cuda_graphs_without_host_sync():
    """On a GPU the views are captured as CUDA graphs: every call (warm-up, capture, replays with new parameters and
    new images) gives the views made without graphs and those made by slices, and once captured, making them never
    waits for the host, either way."""
    graphed, plain = GpuAugment(48), GpuAugment(48, cuda_graphs=False)
    by_slices = data.Augment(48)
    for seed in range(5):
        images = faces_like(32, 48, seed=seed).cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error' if seed >= 2 else 'default')  # capturing synchronises, once
        try:
            got = graphed.labeled_view(images, seeded(seed)), *graphed.unlabeled_views(images, seeded(seed))
            expected = plain.labeled_view(images, seeded(seed)), *plain.unlabeled_views(images, seeded(seed))
            sliced = by_slices.labeled_view(images, seeded(seed)), *by_slices.unlabeled_views(images, seeded(seed))
        finally:
            torch.cuda.set_sync_debug_mode('default')
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), seed
        assert all(torch.equal(a, b) for a, b in zip(sliced, expected)), seed
    for on_device in (graphed.labeled_on_device, graphed.unlabeled_on_device):
        assert on_device.graphs and all(graph is not None for graph in on_device.graphs.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no GPU')
def test_cuda_graphs_captured_while_loader_workers_feed_the_batches(tmp_path):
    """The views' graphs are captured while loader workers stream batches to the GPU, as in train.py: the batches'
    pinning must not break a capture."""
    from PIL import Image
    from fast import loading
    from sources import pools
    paths = []
    for i, image in enumerate(faces_like(40, 48)):
        paths.append(str(tmp_path / f'{i}.png'))
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    pool = data.UnlabeledPool([pools.ListPool(paths)], data.Decode(48))
    stream = loading.batches(pool, 16, data.InfiniteSampler(len(pool), 0), 2, 'cuda')
    augment, plain = GpuAugment(48), GpuAugment(48, cuda_graphs=False)
    for step in range(6):
        images, _, _ = next(stream)
        got = augment.unlabeled_views(images, seeded(step))
        assert all(torch.equal(a, b) for a, b in zip(got, plain.unlabeled_views(images, seeded(step)))), step
    stream.close()
    graphs = augment.unlabeled_on_device.graphs
    assert graphs and all(graph is not None for graph in graphs.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no GPU')
def test_gpu_views_are_the_cpu_views():
    """Parameters are drawn on the CPU: the same seed gives the same views on a GPU, within rounding."""
    augment, images = GpuAugment(112), faces_like(64, 112)
    cpu = augment.unlabeled_views(images, seeded(3))
    gpu = augment.unlabeled_views(images.cuda(), seeded(3))
    for a, b in zip(cpu, gpu):
        difference = (a - b.cpu()).abs()
        assert difference.max() <= 2 / 255 + 1e-6 or (difference > 1e-6).float().mean() < 0.005


@pytest.mark.parametrize('make', [data.Augment, lambda size: GpuAugment(size, cuda_graphs=False)], ids=['plain', 'gpu'])
def test_strong_view_is_weak_view_then_two_operations_then_cutout(make):
    """The views as the method composes them, image by image with torchvision as the reference: the weak view is
    hflip + reflect-padded crop; the strong view is another such view, then the image's two drawn RandAugment
    operations, normalised, then its Cutout box erased to 0."""
    size, n = 48, 48
    augment, images = make(size), faces_like(n, size, seed=5)
    weak_view, strong_view = augment.unlabeled_views(images, seeded(11))
    weak, strong, rounds, box = augment.draw_unlabeled(n, seeded(11))  # the same generator: the same draws

    def weak_reference(image, flip, top, left):
        image = v2.functional.horizontal_flip(image) if flip else image
        padded = v2.functional.pad(image, [augment.pad] * 4, padding_mode='reflect')
        return v2.functional.crop(padded, int(top), int(left), size, size)
    for i in range(n):
        assert torch.equal(weak_view[i], data.normalize(weak_reference(images[i], *weak[i].tolist())[None])[0]), i
        expected = weak_reference(images[i], *strong[i].tolist())
        for op, magnitude in rounds:
            expected = torchvision_op(expected, augment.names[op[i]], magnitude[i].item())
        top, left, h, w = box[i].long().tolist()
        expected = v2.functional.erase(data.normalize(expected[None])[0], top, left, h, w, torch.tensor(0.0))
        off = (strong_view[i] - expected).abs() > 2 / 255 + 1e-6  # within rounding: a unit of 255 either way
        assert off.float().mean() < 0.01, (i, [augment.names[op[i]] for op, _ in rounds], off.float().mean())
