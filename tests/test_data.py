"""
Tests of the data pipeline (augmentation, sampler, seeded determinism, ImageFolder reading, the built-in faces)
and of model.py (ResNet shapes, loading backbone weights from a local file).

    python -m pytest test_data.py
"""
import itertools
import os

import numpy
import pytest
import torch
import torchvision
from PIL import Image

import data
from sources import faces, formats, pools
from model import ARCHS, build_model, load_backbone


def random_image(width, height, seed=0, mode='RGB'):
    generator = torch.Generator().manual_seed(seed)
    channels = len(mode)
    pixels = torch.randint(0, 256, (height, width, channels), dtype=torch.uint8, generator=generator)
    return Image.frombytes(mode, (width, height), pixels.numpy().tobytes())


def to_uint8(view):
    """Undo Normalize(0.5, 0.5) and ToDtype(scale=True)."""
    return ((view * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)


# -----------------------------------------------------------------------------
# augmentation


def test_eval_view_is_exact_normalisation():
    image = random_image(48, 48, seed=1)
    view = data.Augment(48).eval_view(image)
    pixels = torch.tensor(list(image.tobytes()), dtype=torch.float32).view(48, 48, 3).permute(2, 0, 1)
    assert view.shape == (3, 48, 48) and view.dtype == torch.float32
    assert torch.allclose(view, (pixels / 255 - 0.5) / 0.5, atol=1e-6)
    augment = data.Augment(48)
    assert torch.all(augment.eval_view(Image.new('RGB', (48, 48), (255, 255, 255))) == 1.0)
    assert torch.all(augment.eval_view(Image.new('RGB', (48, 48), (0, 0, 0))) == -1.0)


def test_grey_views_are_the_luma_of_the_image_in_three_channels():
    image = random_image(48, 48, seed=4)
    grey = data.Augment(48, grey=True)
    luma = torch.tensor(list(image.convert('L').tobytes()), dtype=torch.float32).view(1, 48, 48)
    view = grey.eval_view(image)
    assert view.shape == (3, 48, 48) and torch.equal(view[0], view[1]) and torch.equal(view[1], view[2])
    assert (to_uint8(view[:1]).float() - luma).abs().max() <= 1  # PIL's integer luma rounds differently
    torch.manual_seed(0)
    for view in (grey.weak_view(image), *grey.two_views(image)):
        assert torch.equal(view[0], view[1]) and torch.equal(view[1], view[2])  # RandAugment keeps it grey
    assert not torch.equal(data.Augment(48).eval_view(image)[0], data.Augment(48).eval_view(image)[1])


@pytest.mark.parametrize('size', [48, 112])
def test_view_shapes_dtype_and_range(size):
    augment = data.Augment(size)
    image = random_image(64, 40, seed=2)  # not square, not the target size
    torch.manual_seed(0)
    views = [augment.eval_view(image), augment.weak_view(image), *augment.two_views(image)]
    for view in views:
        assert view.shape == (3, size, size) and view.dtype == torch.float32
        assert view.min() >= -1.0 and view.max() <= 1.0
    weak, strong = views[2:]
    assert not torch.equal(weak, strong)


def test_weak_view_is_a_flip_and_small_translation():
    """weak = horizontal flip + translation by at most img_size/8 (reflect padding): the interior of the view
    is the original shifted by some (dy, dx) within the padding, possibly mirrored, with unchanged colours."""
    size, pad = 48, 6
    image = random_image(size, size, seed=3)
    original = data.Augment(size).decode(image)
    augment = data.Augment(size)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        weak = to_uint8(augment.weak_view(image))
        found = None
        for flip, dy, dx in itertools.product((False, True), range(-pad, pad + 1), range(-pad, pad + 1)):
            source = original.flip(-1) if flip else original
            # view[y, x] = source[y + dy, x + dx] on the interior, where no padding is involved
            inner = weak[:, pad:size - pad, pad:size - pad]
            shifted = source[:, pad + dy:size - pad + dy, pad + dx:size - pad + dx]
            if torch.equal(inner, shifted):
                found = (flip, dy, dx)
                break
        assert found is not None, f'seed {seed}: the weak view is not a flipped/translated copy of the image'
        flips.add(found[0])
    assert flips == {False, True}  # both happen in 12 draws (probability of not: 2 * 2^-12)


def test_two_views_decode_once(monkeypatch):
    calls = []
    decode = data.Augment.decode
    monkeypatch.setattr(data.Augment, 'decode', lambda self, image: calls.append(1) or decode(self, image))
    weak, strong = data.Augment(48).two_views(random_image(60, 60))
    assert len(calls) == 1
    assert weak.shape == strong.shape == (3, 48, 48)


def test_cutout_draws_the_boxes_of_random_erasing():
    """Augment.cutout is torchvision's RandomErasing(p=1, scale=(0.02, 0.15), value=0) written out for speed: the
    erased boxes' heights, widths and positions have the same distribution."""
    def boxes(erase, n=3000):
        found = []
        for _ in range(n):
            hole = erase(torch.ones(3, 48, 48))[0] == 0
            rows, cols = hole.any(1).nonzero(), hole.any(0).nonzero()
            found.append((len(rows), len(cols), rows.min().item(), cols.min().item()))
        return torch.tensor(found, dtype=torch.float)
    torch.manual_seed(0)
    ours = boxes(data.Augment(48).cutout)
    theirs = boxes(torchvision.transforms.v2.RandomErasing(p=1.0, scale=(0.02, 0.15), value=0))
    assert torch.allclose(ours.mean(0), theirs.mean(0), rtol=0.05)  # ~6 standard errors
    assert torch.allclose(ours.std(0), theirs.std(0), rtol=0.08)


def test_unlabeled_pool_opens_each_image_once(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f'{i}.png'))
        random_image(48, 48, seed=i).save(paths[-1])
    opened = []
    open_image = formats.open_image
    monkeypatch.setattr(pools, 'open_image', lambda source: opened.append(source) or open_image(source))
    pool = data.UnlabeledPool([pools.ListPool(paths)], data.Augment(48))
    weak, strong, index, skipped = pool[(1, 1234)]
    assert opened == [paths[1]] and index == 1 and skipped == 0
    assert weak.shape == strong.shape == (3, 48, 48) and not torch.equal(weak, strong)


def test_unlabeled_pool_skips_unreadable_images(tmp_path):
    paths = [str(tmp_path / 'good0.png'), str(tmp_path / 'bad.png'), str(tmp_path / 'good1.png')]
    random_image(48, 48, seed=0).save(paths[0])
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    random_image(48, 48, seed=1).save(paths[2])
    pool = data.UnlabeledPool([pools.ListPool(paths)], data.Augment(48))
    weak, strong, index, skipped = pool[(1, 7)]
    assert index == 2 and skipped == 1


# -----------------------------------------------------------------------------
# the sampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_epochs_are_permutations():
    size = 10
    stream = take(data.InfiniteSampler(size, seed=3), 4 * size)
    indices = [index for index, _ in stream]
    epochs = [indices[e * size:(e + 1) * size] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(size))
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    seeds = [seed for _, seed in stream]
    assert len(set(seeds)) == len(seeds)  # every position its own augmentation seed
    assert take(data.InfiniteSampler(size, seed=4), size) != stream[:size]


@pytest.mark.parametrize('world', [2, 3])
def test_sampler_ranks_partition_the_stream(world):
    size, n = 10, 25
    single = take(data.InfiniteSampler(size, seed=5), world * n)
    ranks = [take(data.InfiniteSampler(size, seed=5, rank=r, world=world), n) for r in range(world)]
    for r in range(world):  # rank r holds positions r, r + world, ... of the one-process stream, keys included
        assert ranks[r] == single[r::world]
    # within an epoch, the ranks' samples are disjoint and together cover the set once
    for epoch in range(2):
        seen = [index for r in range(world) for k, (index, _) in enumerate(ranks[r])
                if (r + k * world) // size == epoch]
        assert sorted(seen) == list(range(size))
    assert not set(ranks[0]) & set(ranks[1])  # no (index, seed) key is drawn by two ranks


@pytest.mark.parametrize('world,rank,start', [(1, 0, 7), (1, 0, 23), (2, 1, 6), (3, 2, 4)])
def test_sampler_start_resumes_the_same_stream(world, rank, start):
    full = take(data.InfiniteSampler(10, seed=2, rank=rank, world=world), start + 15)
    resumed = take(data.InfiniteSampler(10, seed=2, rank=rank, world=world, start=start), 15)
    assert resumed == full[start:]


def test_class_balanced_weights():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    weights = data.class_balanced_weights(labels, 4)  # class 3 is empty: no division by zero
    assert weights.shape == (100,)
    assert torch.allclose(weights[:90], torch.tensor(1 / 90)) and torch.allclose(weights[90:99], torch.tensor(1 / 9))
    assert weights[99].item() == pytest.approx(1.0)
    stream = take(data.InfiniteSampler(100, seed=0, weights=weights), 6000)
    counts = torch.bincount(torch.tensor([labels[index] for index, _ in stream]), minlength=3).float() / 6000
    # each class about 1/3 (binomial std 0.006); unbalanced it would be 0.90 / 0.09 / 0.01
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.04), counts


# -----------------------------------------------------------------------------
# seeded augmentation: a sample's views are a function of its (index, seed) key alone


@pytest.fixture
def folder(tmp_path):
    """ROOT/train/<class>/ with a few images, including a nested folder, an upper-case extension, a grey image
    and a file that is not an image."""
    root = tmp_path / 'set'
    for name, count in (('happy', 3), ('angry', 2)):
        os.makedirs(root / 'train' / name)
        for i in range(count):
            random_image(40 + i, 48, seed=10 * len(name) + i).save(root / 'train' / name / f'{i}.png')
    os.makedirs(root / 'train' / 'angry' / 'more')
    random_image(48, 48, seed=99, mode='L').save(root / 'train' / 'angry' / 'more' / 'grey.PNG')
    (root / 'train' / 'angry' / 'notes.txt').write_text('not an image')
    os.makedirs(root / 'val' / 'angry')
    os.makedirs(root / 'val' / 'happy')
    return root


def test_seeded_views_are_reproducible_in_any_order(folder, tmp_path):
    labeled = data.load_labeled(str(folder), 'train', 'imagefolder')
    labeled.view = data.Augment(48).weak_view
    pool = data.UnlabeledPool([pools.ListPool(labeled.items)], data.Augment(48))
    keys = [(0, 11), (2, 12), (4, 13), (0, 14)]
    first = {key: (labeled[key], pool[key]) for key in keys}
    torch.manual_seed(1)
    torch.rand(5)  # a different global RNG state
    rng = torch.get_rng_state()
    again = {key: (labeled[key], pool[key]) for key in reversed(keys)}
    assert torch.equal(torch.get_rng_state(), rng)  # reading a sample leaves the global RNG alone
    for key in keys:
        (image_a, label_a), (weak_a, strong_a, *_) = first[key]
        (image_b, label_b), (weak_b, strong_b, *_) = again[key]
        assert label_a == label_b
        assert torch.equal(image_a, image_b) and torch.equal(weak_a, weak_b) and torch.equal(strong_a, strong_b)
    # the same image with another seed gets other views
    assert not torch.equal(first[(0, 11)][1][1], first[(0, 14)][1][1])


def test_seeded_views_do_not_depend_on_workers(tmp_path):
    paths = []
    for i in range(6):
        paths.append(str(tmp_path / f'{i}.png'))
        random_image(48, 48, seed=i).save(paths[-1])
    pool = data.UnlabeledPool([pools.ListPool(paths)], data.Augment(48))
    batches = {}
    for workers in (0, 2):
        loader = data.loader(pool, 4, data.InfiniteSampler(len(pool), seed=1), workers=workers)
        iterator = iter(loader)
        batches[workers] = [next(iterator) for _ in range(3)]
        del iterator, loader
    for a, b in zip(batches[0], batches[2]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# -----------------------------------------------------------------------------
# ImageFolder reading


def test_read_imagefolder(folder):
    labeled = data.load_labeled(str(folder), 'train', 'imagefolder')
    assert list(labeled.classes) == ['angry', 'happy']  # sorted
    assert len(labeled) == 6 and sorted(labeled.labels) == [0, 0, 0, 1, 1, 1]
    assert not any(str(item).endswith('.txt') for item in labeled.items)
    assert any(str(item).endswith('grey.PNG') for item in labeled.items)
    labeled.view = data.Augment(48).eval_view
    for i in range(len(labeled)):
        image, label = labeled[i]
        assert image.shape == (3, 48, 48) and label == labeled.labels[i]
        source = labeled.items[i]
        assert os.path.basename(os.path.dirname(source)) in (labeled.classes[label], 'more')
    grey = labeled.items.index(next(item for item in labeled.items if str(item).endswith('grey.PNG')))
    image, _ = labeled[grey]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey -> 3 equal channels
    assert labeled.labels[grey] == 0


def test_load_labeled_detects_imagefolder(folder):
    labeled = data.load_labeled(str(folder), 'train')
    assert list(labeled.classes) == ['angry', 'happy'] and len(labeled) == 6


def test_read_imagefolder_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError):
        formats.read_imagefolder(str(folder), 'test')  # no such split
    with pytest.raises(ValueError):
        formats.read_imagefolder(str(folder), 'val')   # class folders, no images
    (folder / 'train' / 'happy' / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    labeled = data.load_labeled(str(folder), 'train', 'imagefolder')
    labeled.view = data.Augment(48).eval_view
    broken = next(i for i, item in enumerate(labeled.items) if str(item).endswith('broken.jpg'))
    with pytest.raises(RuntimeError, match='broken.jpg'):
        labeled[broken]


def test_image_modes_become_rgb(tmp_path):
    # 16-bit grey keeps the high byte: 25600 -> 100, 65280 -> 255
    values = numpy.array([[0, 25600], [65280, 256]], dtype='<u2')
    grey16 = Image.frombytes('I;16', (2, 2), values.tobytes())
    grey16.save(tmp_path / 'grey16.png')
    image = formats.open_image(str(tmp_path / 'grey16.png'))
    assert image.mode == 'RGB' and list(image.tobytes())[0::3] == [0, 100, 255, 1]
    # RGBA: transparent pixels become black
    rgba = Image.new('RGBA', (2, 1), (200, 100, 50, 255))
    rgba.putpixel((1, 0), (200, 100, 50, 0))
    rgba.save(tmp_path / 'rgba.png')
    assert list(formats.open_image(str(tmp_path / 'rgba.png')).tobytes()) == [200, 100, 50, 0, 0, 0]


# -----------------------------------------------------------------------------
# the built-in procedural faces


def test_generate_faces(tmp_path):
    root = str(tmp_path / 'faces')
    counts = (100, 20, 100)
    faces.generate_faces(root, counts=counts, identities=(3, 2, 3), seed=0)
    assert sorted(os.listdir(tmp_path)) == ['faces']  # the temporary folder was renamed, nothing left over
    assert sorted(os.listdir(root)) == ['train', 'unlabeled', 'val']
    for split, count, mix in zip(('train', 'val', 'unlabeled'), counts,
                                 (faces.LABELED_MIX, faces.LABELED_MIX, faces.UNLABELED_MIX)):
        assert sorted(os.listdir(os.path.join(root, split))) == sorted(faces.CLASSES)
        per_class = {c: len(os.listdir(os.path.join(root, split, c))) for c in faces.CLASSES}
        assert sum(per_class.values()) == count, (split, per_class)
        if count == 100:  # every share is a whole number of images here
            assert [per_class[c] for c in faces.CLASSES] == [round(share * 100) for share in mix]
    labeled = data.load_labeled(root, 'train', 'imagefolder')
    assert len(labeled) == 100 and sorted(labeled.classes) == sorted(faces.CLASSES)
    for item in labeled.items[::17]:
        with Image.open(item) as image:
            assert image.size == (48, 48) and image.mode == 'RGB'


def test_generate_faces_is_reproducible_from_its_seed(tmp_path):
    faces.generate_faces(str(tmp_path / 'again'), counts=(3, 1, 1), identities=(1, 1, 1), seed=0)
    faces.generate_faces(str(tmp_path / 'again2'), counts=(3, 1, 1), identities=(1, 1, 1), seed=0)
    a = sorted(pools.scan_images(str(tmp_path / 'again')))
    b = sorted(pools.scan_images(str(tmp_path / 'again2')))
    assert [os.path.relpath(p, tmp_path / 'again') for p in a] == [os.path.relpath(p, tmp_path / 'again2') for p in b]
    for p, q in zip(a, b):
        with Image.open(p) as x, Image.open(q) as y:
            assert x.tobytes() == y.tobytes()


# -----------------------------------------------------------------------------
# model.py


@pytest.mark.parametrize('arch', ARCHS)
def test_build_model_shapes(arch):
    model = build_model(arch, num_classes=8).eval()
    assert model.fc.out_features == 8
    with torch.no_grad():
        for size in (48, 112):
            assert model(torch.randn(2, 3, size, size)).shape == (2, 8)


def test_build_model_rejects_unknown_arch():
    with pytest.raises(ValueError):
        build_model('vgg16', 8)


@pytest.fixture(scope='module')
def imagenet_resnet18(tmp_path_factory):
    """An ImageNet-style resnet18 state dict (1000-way fc), randomly initialised, saved to a local file."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    for key, value in state.items():  # make the BN statistics distinguishable from a fresh model's
        if key.endswith('running_var'):
            value.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp('weights') / 'resnet18.pth'
    torch.save(state, path)
    return path, state


def test_load_backbone_imagenet_file(imagenet_resnet18):
    path, state = imagenet_resnet18
    model = build_model('resnet18', num_classes=8, weights=str(path))
    own = model.state_dict()
    backbone = [k for k in state if not k.startswith('fc.')]
    assert len(backbone) == len(state) - 2  # fc.weight, fc.bias
    for key in backbone:
        assert torch.equal(own[key], state[key]), key
    assert own['fc.weight'].shape == (8, 512)
    assert load_backbone(torchvision.models.resnet18(num_classes=8), str(path)) == len(backbone)


def test_load_backbone_never_loads_fc(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=8).state_dict()  # an fc of the very same shape
    torch.save(state, tmp_path / 'same_fc.pt')
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=8)
    fc = model.fc.weight.detach().clone()
    load_backbone(model, str(tmp_path / 'same_fc.pt'))
    assert torch.equal(model.fc.weight, fc) and not torch.equal(model.fc.weight, state['fc.weight'])
    assert torch.equal(model.conv1.weight, state['conv1.weight'])


def test_load_backbone_module_prefix_and_wrapped_checkpoint(imagenet_resnet18, tmp_path):
    _, state = imagenet_resnet18
    prefixed = {'module.' + k: v for k, v in state.items()}
    torch.save({'state_dict': prefixed, 'epoch': 90}, tmp_path / 'ddp.pth.tar')
    model = torchvision.models.resnet18(num_classes=8)
    assert load_backbone(model, str(tmp_path / 'ddp.pth.tar')) == len(state) - 2
    assert torch.equal(model.layer4[1].bn2.running_var, state['layer4.1.bn2.running_var'])


def test_load_backbone_without_matching_tensors_raises(tmp_path):
    torch.save({'encoder.weight': torch.randn(4, 4), 'decoder.bias': torch.randn(4)}, tmp_path / 'other.pt')
    with pytest.raises(ValueError):
        load_backbone(torchvision.models.resnet18(num_classes=8), str(tmp_path / 'other.pt'))
    torch.save({'conv1.weight': torch.randn(64, 3, 3, 3)}, tmp_path / 'wrong_shape.pt')  # name matches, shape not
    with pytest.raises(ValueError):
        load_backbone(torchvision.models.resnet18(num_classes=8), str(tmp_path / 'wrong_shape.pt'))
    torch.save({'a': 1, 'b': 'text'}, tmp_path / 'not_tensors.pt')
    with pytest.raises(ValueError):
        load_backbone(torchvision.models.resnet18(num_classes=8), str(tmp_path / 'not_tensors.pt'))


def test_load_backbone_from_a_train_checkpoint(tmp_path):
    """fer_lfw.py --pretrain passes train.py's own best.pt (a 610-identity classifier) as --weights: its live 'model'
    weights are the backbone, whatever else the checkpoint holds."""
    torch.manual_seed(0)
    live, ema = torchvision.models.resnet18(num_classes=610).state_dict(), torchvision.models.resnet18().state_dict()
    torch.save(dict(model=live, ema_model=ema, step=1500, best_f1=0.3, config={'arch': 'resnet18'},
                    classes=[f'person{i}' for i in range(610)], rng=dict(torch=torch.get_rng_state())),
               tmp_path / 'best.pt')
    model = build_model('resnet18', num_classes=7, weights=str(tmp_path / 'best.pt'))
    assert torch.equal(model.layer3[0].conv1.weight, live['layer3.0.conv1.weight'])
    assert model.fc.weight.shape == (7, 512)


def test_default_workers_scale_with_the_cores_on_a_gpu(monkeypatch):
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(16)), raising=False)
    assert data.default_workers(cuda=False) == 2  # on the CPU the workers compete with the step
    assert data.default_workers(cuda=True) == 8
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')  # torchrun, 4 processes on the host: each gets its share
    assert data.default_workers(cuda=True) == 2
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(64)))
    assert data.default_workers(cuda=True) == 8
    monkeypatch.delenv('LOCAL_WORLD_SIZE')
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
    assert data.default_workers(cuda=True) == 2  # never fewer than the CPU default
