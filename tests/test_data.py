"""
Tests of the data pipeline (decoding, datasets, sampler, in-memory sets and batch streams, ImageFolder reading, the
built-in faces) and of model.py (ResNet shapes, loading backbone weights from a local file). The augmentation is
tested in test_augment.py.

    python -m pytest tests/test_data.py
"""
import itertools
import os
import re

import numpy
import pytest
import torch
import torchvision
from PIL import Image

import data
from fast import loading
from sources import faces, formats, pools
from model import ARCHS, build_model, load_backbone


def random_image(width, height, seed=0, mode='RGB'):
    generator = torch.Generator().manual_seed(seed)
    channels = len(mode)
    pixels = torch.randint(0, 256, (height, width, channels), dtype=torch.uint8, generator=generator)
    return Image.frombytes(mode, (width, height), pixels.numpy().tobytes())


# -----------------------------------------------------------------------------
# decoding


def pixels(image):
    """A PIL image's bytes as a uint8 tensor (3, H, W), read without torchvision."""
    return torch.tensor(list(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3).permute(2, 0, 1)


def test_decode_keeps_pixels_and_normalize_is_exact():
    image = random_image(48, 48, seed=1)
    decoded = data.Decode(48)(image)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, pixels(image))
    view = data.normalize(decoded[None])
    assert view.dtype == torch.float32 and torch.allclose(view[0], (pixels(image) / 255 - 0.5) / 0.5, atol=1e-6)
    white, black = (data.Decode(48)(Image.new('RGB', (48, 48), colour)) for colour in ((255,) * 3, (0,) * 3))
    assert data.normalize(white[None]).eq(1).all() and data.normalize(black[None]).eq(-1).all()


def test_decode_resizes_and_greys():
    image = random_image(64, 40, seed=2)  # not square, not the target size
    decoded = data.Decode(48)(image)
    assert decoded.shape == (3, 48, 48) and decoded.dtype == torch.uint8
    resized = torchvision.transforms.v2.functional.resize(pixels(image), [48, 48], antialias=True)
    assert torch.equal(decoded, resized)
    grey = data.Decode(48, grey=True)(random_image(48, 48, seed=4))
    luma = pixels(random_image(48, 48, seed=4).convert('L').convert('RGB'))
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert (grey.int() - luma.int()).abs().max() <= 1  # PIL's integer luma rounds differently


def test_unlabeled_pool_opens_each_image_once(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f'{i}.png'))
        random_image(48, 48, seed=i).save(paths[-1])
    opened = []
    open_image = formats.open_image
    monkeypatch.setattr(pools, 'open_image', lambda source: opened.append(source) or open_image(source))
    pool = data.UnlabeledPool([pools.ListPool(paths)], data.Decode(48))
    image, index, skipped = pool[1]
    assert opened == [paths[1]] and index == 1 and skipped == 0
    assert torch.equal(image, pixels(random_image(48, 48, seed=1)))


def test_unlabeled_pool_skips_unreadable_images(tmp_path):
    paths = [str(tmp_path / 'good0.png'), str(tmp_path / 'bad.png'), str(tmp_path / 'good1.png')]
    random_image(48, 48, seed=0).save(paths[0])
    (tmp_path / 'bad.png').write_bytes(b'not an image')
    random_image(48, 48, seed=1).save(paths[2])
    pool = data.UnlabeledPool([pools.ListPool(paths)], data.Decode(48))
    image, index, skipped = pool[1]
    assert index == 2 and skipped == 1 and torch.equal(image, pixels(random_image(48, 48, seed=1)))


# -----------------------------------------------------------------------------
# the sampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_epochs_are_permutations():
    size = 10
    indices = take(data.InfiniteSampler(size, seed=3), 4 * size)
    epochs = [indices[e * size:(e + 1) * size] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(size))
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    assert take(data.InfiniteSampler(size, seed=4), size) != indices[:size]


@pytest.mark.parametrize('world', [2, 3])
def test_sampler_ranks_partition_the_stream(world):
    size, n = 10, 25
    single = take(data.InfiniteSampler(size, seed=5), world * n)
    ranks = [take(data.InfiniteSampler(size, seed=5, rank=r, world=world), n) for r in range(world)]
    for r in range(world):  # rank r holds positions r, r + world, ... of the one-process stream
        assert ranks[r] == single[r::world]
    # within an epoch, the ranks' samples are disjoint and together cover the set once
    for epoch in range(2):
        seen = [index for r in range(world) for k, index in enumerate(ranks[r])
                if (r + k * world) // size == epoch]
        assert sorted(seen) == list(range(size))


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
    counts = torch.bincount(torch.tensor([labels[index] for index in stream]), minlength=3).float() / 6000
    # each class about 1/3 (binomial std 0.006); unbalanced it would be 0.90 / 0.09 / 0.01
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.04), counts



# -----------------------------------------------------------------------------
# in-memory sets and batch streams


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


def test_in_memory_labeled_set_is_the_decoded_set(folder):
    labeled = data.load_labeled(str(folder), 'train', 'imagefolder')
    labeled.decode = data.Decode(48)
    kept = loading.in_memory(labeled, workers=2)
    assert kept.images.shape == (6, 3, 48, 48) and kept.images.dtype == torch.uint8 and kept.unreadable == 0
    assert torch.equal(kept.images, torch.stack([labeled[i][0] for i in range(6)]))
    assert kept.labels == labeled.labels and kept.classes == labeled.classes and len(kept) == 6
    image, label = kept[3]
    assert torch.equal(image, labeled[3][0]) and label == labeled.labels[3]


def test_in_memory_by_default_on_a_gpu_when_a_quarter_of_its_free_memory_holds_the_set(monkeypatch):
    free = 4 * 1000 * 3 * 48 * 48  # bytes: a quarter of it holds 1000 images at 48 px
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device: (free, 2 * free))
    assert loading.worth_keeping(1000, 48, 'cuda:0') and loading.worth_keeping(1000, 48, torch.device('cuda', 0))
    assert not loading.worth_keeping(1001, 48, 'cuda:0') and not loading.worth_keeping(1000, 49, 'cuda:0')
    assert not loading.worth_keeping(10, 48, 'cpu')  # on the CPU the workers keep up: streaming saves the memory


def test_unreadable_image_raised_in_a_loader_worker_reads_as_its_message():
    from torch._utils import ExceptionWrapper  # how a DataLoader carries a worker's exception to the training process
    message = 'set: cannot read image a.png: truncated: 12 bytes\nsecond line'
    try:
        raise data.UnreadableImage(message)
    except data.UnreadableImage:
        carried = ExceptionWrapper(where='in DataLoader worker process 0')
    with pytest.raises(data.UnreadableImage) as raised:
        carried.reraise()
    assert 'Original Traceback' in super(data.UnreadableImage, raised.value).__str__()
    assert str(raised.value) == message and str(data.UnreadableImage(message)) == message


def test_next_readable_is_where_the_pool_finds_an_image():
    generator = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 50):
        for _ in range(20):
            readable = torch.rand(n, generator=generator) < 0.4
            readable[torch.randint(n, (), generator=generator)] = True  # at least one
            expected = [next((i + k) % n for k in range(n) if readable[(i + k) % n]) for i in range(n)]
            assert loading.next_readable(readable).tolist() == expected
    assert loading.next_readable(torch.tensor([False, True, False, False])).tolist() == [1, 1, 1, 1]  # past the end


def test_in_memory_pool_stops_where_streaming_would(tmp_path):
    """100 unreadable images in a row stop a pool in memory, as they stop it streamed; none readable at all too."""
    paths = [str(tmp_path / f'{i}.png') for i in range(101)]
    for path in paths[:100]:
        open(path, 'w').write('not an image')
    random_image(8, 8).save(paths[100])
    pool = data.UnlabeledPool([pools.ListPool(paths)], data.Decode(8))
    first = '100 unreadable images in a row in the unlabeled pool, from ' + re.escape(paths[0]) + '$'
    with pytest.raises(RuntimeError, match=first):
        pool[0]
    with pytest.raises(RuntimeError, match=first):
        loading.in_memory(pool, workers=0)
    pool = data.UnlabeledPool([pools.ListPool(paths[1:])], data.Decode(8))  # 99 in a row: each finds the last one
    kept = loading.in_memory(pool, workers=0)
    assert kept.unreadable == 99 and kept.columns[1].tolist() == [99] * 100
    assert [pool[i][1:] for i in (0, 98, 99)] == [(99, 99), (99, 1), (99, 0)]
    assert kept.columns[2].tolist() == [99 - i for i in range(100)]
    with pytest.raises(RuntimeError, match='no readable image'):
        loading.in_memory(data.UnlabeledPool([pools.ListPool(paths[:3])], data.Decode(8)), workers=0)


def pool_of(tmp_path, n):
    paths = []
    for i in range(n):
        paths.append(str(tmp_path / f'{i}.png'))
        random_image(40, 40, seed=i).save(paths[-1])
    return data.UnlabeledPool([pools.ListPool(paths)], data.Decode(32))


def test_batches_stream_in_sampler_order_whatever_the_workers_or_memory(tmp_path):
    """The same sampler gives the same batches streamed through 0 or 2 workers or from the decoded tensor."""
    pool = pool_of(tmp_path, 10)
    kept = loading.in_memory(pool, workers=0)
    assert len(kept) == 10 and torch.equal(kept.columns[1], torch.arange(10))
    found = {}
    for name, dataset, workers in (('main', pool, 0), ('workers', pool, 2), ('memory', kept, 0)):
        stream = loading.batches(dataset, 4, data.InfiniteSampler(10, seed=1), workers, 'cpu')
        found[name] = [next(stream) for _ in range(5)]  # 20 samples: two epochs
        stream.close()
    order = take(data.InfiniteSampler(10, seed=1), 20)
    for name, batches in found.items():
        assert [i for images, index, skipped in batches for i in index.tolist()] == order, name
        for images, index, skipped in batches:
            assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8 and not skipped.any()
            assert torch.equal(images, torch.stack([pool[i][0] for i in index.tolist()])), name


def test_batches_of_a_labeled_set(folder):
    labeled = data.load_labeled(str(folder), 'train', 'imagefolder')
    labeled.decode = data.Decode(48)
    for dataset in (labeled, loading.in_memory(labeled, workers=0)):
        images, labels = next(loading.batches(dataset, 4, data.InfiniteSampler(6, seed=0), 0, 'cpu'))
        assert images.shape == (4, 3, 48, 48) and labels.dtype == torch.int64
        assert labels.tolist() == [labeled.labels[i] for i in take(data.InfiniteSampler(6, seed=0), 4)]


# -----------------------------------------------------------------------------
# ImageFolder reading


def test_read_imagefolder(folder):
    labeled = data.load_labeled(str(folder), 'train', 'imagefolder')
    assert list(labeled.classes) == ['angry', 'happy']  # sorted
    assert len(labeled) == 6 and sorted(labeled.labels) == [0, 0, 0, 1, 1, 1]
    assert not any(str(item).endswith('.txt') for item in labeled.items)
    assert any(str(item).endswith('grey.PNG') for item in labeled.items)
    labeled.decode = data.Decode(48)
    for i in range(len(labeled)):
        image, label = labeled[i]
        assert image.shape == (3, 48, 48) and image.dtype == torch.uint8 and label == labeled.labels[i]
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
    labeled.decode = data.Decode(48)
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
    assert sorted(os.listdir(root)) == ['generator.sha256', 'train', 'unlabeled', 'val']
    for split, count in zip(('train', 'val', 'unlabeled'), counts):
        mix = faces.SPLITS[split][2]
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


def test_a_set_drawn_by_other_code_is_drawn_again_and_the_skewed_pool_is_labeled(tmp_path, monkeypatch):
    small = {split: (8, 2, mix, wild) for split, (_, _, mix, wild) in faces.SPLITS.items()}
    monkeypatch.setattr(faces, 'SPLITS', small)
    monkeypatch.setattr(faces, 'SKEWED_POOL', (100, 3, *faces.SKEWED_POOL[2:]))
    root = str(tmp_path / 'faces')
    os.makedirs(os.path.join(root, 'train'))
    with open(os.path.join(root, 'generator.sha256'), 'w') as f:
        f.write('drawn by another version')
    faces.default_data(root)
    assert open(os.path.join(root, 'generator.sha256')).read() == faces.generator_hash()
    assert len(pools.scan_images(os.path.join(root, 'train'))) == 8
    folder = faces.skewed_pool(root)
    per_class = {c: len(os.listdir(os.path.join(folder, c))) for c in faces.CLASSES}
    assert [per_class[c] for c in faces.CLASSES] == [round(share * 100) for share in faces.SKEWED_MIX]
    with open(faces.pool_labels(root, 'unlabeled_skewed')) as f:
        rows = {tuple(line.strip().split(',')) for line in f}
    assert rows == {(name, c) for c in faces.CLASSES for name in os.listdir(os.path.join(folder, c))}


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


def test_default_workers_split_the_cores_by_the_images_each_stream_decodes(monkeypatch):
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    monkeypatch.setattr(loading, 'CORES', set(range(16)))
    assert loading.default_workers(cuda=False) == 2  # on the CPU the workers compete with the step
    assert loading.default_workers(cuda=True) == 15  # one stream: every core but the training process's
    assert loading.default_workers(cuda=True, share=1 / 8) == 2  # mu = 7: the labeled stream decodes 1 image in 8 ...
    assert loading.default_workers(cuda=True, share=7 / 8) == 13  # ... the unlabeled one the other 7
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')  # torchrun, 4 processes on the host: each gets its share
    assert loading.default_workers(cuda=True) == 3
    monkeypatch.setattr(loading, 'CORES', set(range(64)))
    assert loading.default_workers(cuda=True, share=7 / 8) == 13
    monkeypatch.delenv('LOCAL_WORLD_SIZE')
    monkeypatch.setattr(loading, 'CORES', {0, 1})
    assert loading.default_workers(cuda=True, share=1 / 8) == 2  # never fewer than the CPU default


class CoresSeen(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return len(os.sched_getaffinity(0))


@pytest.mark.skipif(not hasattr(os, 'sched_getaffinity') or len(os.sched_getaffinity(0)) < 2,
                    reason='needs a process that may run on 2 cores or more')
@pytest.mark.filterwarnings('ignore:This DataLoader will create')  # torch counts the cores of the bound thread
def test_loader_workers_take_back_the_cores_the_process_had_at_import():
    cores = os.sched_getaffinity(0)
    assert loading.CORES == cores
    try:
        os.sched_setaffinity(0, {min(cores)})  # a runtime binds the training thread; forked children inherit that
    except OSError:
        pytest.skip('this process may not set its CPU affinity')
    try:
        seen = [int(n) for n in loading.loader(CoresSeen(), 1, workers=2)]
    finally:
        os.sched_setaffinity(0, cores)
    assert seen == [len(cores)] * 4
