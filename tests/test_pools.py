"""Unlabeled pools: folder index and its cache, RecordIO (the real MXNet-written file and files written here),
labeled sets as pools, and UnlabeledPool's skipping of bad files. Run: python -m pytest -q test_pools.py"""
import io
import os
import pickle
import runpy
import struct
import sys
import tarfile

import pytest
import torch
from PIL import Image, ImageChops

import data
from fast import loading
from sources import pools
from tools import inspect_data

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
MAGIC = struct.pack('<I', pools.RECORD_MAGIC)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Index caches that cannot go beside their source go to ~/.cache/dtm: here, a temporary home."""
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    return tmp_path / 'home'


def image_bytes(value, fmt='PNG', size=8):
    buffer = io.BytesIO()
    Image.new('RGB', (size, size), (value, 255 - value, 7)).save(buffer, fmt)
    return buffer.getvalue()


def pack(label, image=b'', id=0):
    """A record payload as mxnet.recordio.pack writes it: a number label gives flag 0, a tuple gives flag = len."""
    if isinstance(label, tuple):
        return struct.pack('<IfQQ', len(label), 0.0, id, 0) + struct.pack(f'<{len(label)}f', *label) + image
    return struct.pack('<IfQQ', 0, label, id, 0) + image


def write_rec(folder, payloads):
    """train.rec + train.idx as dmlc-core's RecordIOWriter writes them: a payload is cut wherever the magic number
    sits on a 4-byte boundary in it (continuation flags 1, 2, 3) and the magic itself is dropped."""
    with open(os.path.join(folder, 'train.rec'), 'wb') as rec, open(os.path.join(folder, 'train.idx'), 'w') as idx:
        for key, payload in enumerate(payloads):
            idx.write(f'{key}\t{rec.tell()}\n')
            cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == MAGIC]
            for n, (a, b) in enumerate(zip([0] + [c + 4 for c in cuts], cuts + [len(payload)])):
                flag = 0 if not cuts else 1 if n == 0 else 3 if n == len(cuts) else 2
                rec.write(MAGIC + struct.pack('<I', flag << 29 | (b - a)) + payload[a:b] + b'\0' * (-(b - a) % 4))
    return os.path.join(folder, 'train.rec')


def with_magic_inside(png):
    """A PNG whose record payload holds the magic number on a 4-byte boundary twice (bytes after IEND are
    ignored by decoders): the writer must split it into a three-part record."""
    pad = -(24 + len(png)) % 4
    return png + b'\0' * pad + MAGIC + b'abcd' + MAGIC


def insightface_payloads(images):
    """Header record, image records labelled with their identity, identity-range records: MS1M's layout."""
    n = len(images)
    return ([pack((n + 1.0, n + 3.0))] + [pack(float(i // 2), img, id=i + 1) for i, img in enumerate(images)] +
            [pack((1.0, 3.0)), pack((3.0, float(n + 1)))])


def test_record_pool_written_here(tmp_path, monkeypatch):
    images = [image_bytes(10), with_magic_inside(image_bytes(20)), image_bytes(30, 'JPEG')]
    rec = write_rec(tmp_path, insightface_payloads(images))
    assert open(rec, 'rb').read().count(MAGIC) == len(images) + 3 + 2  # the split record has three parts
    pool = pools.open_pool(str(tmp_path))
    assert isinstance(pool, pools.RecordPool) and len(pool) == 3
    assert [pool.name(i) for i in range(3)] == [f'{rec} record {k}' for k in (1, 2, 3)]
    for i, value in enumerate((10, 20)):
        assert pool.read(i).getpixel((3, 3)) == (value, 255 - value, 7)
        assert pools.unpack_record(pool.payload(pool.offsets[i].item()))[1] == images[i]  # multi-part rejoined
    assert pool.read(2).size == (8, 8)
    # a copy in another process (spawned DataLoader worker) opens its own file
    copy = pickle.loads(pickle.dumps(pool))
    assert copy.file is None and copy.read(0).getpixel((0, 0)) == (10, 245, 7)
    # the parsed .idx is cached beside it: the next start does not parse it
    assert os.path.isfile(tmp_path / '.train.idx.dtm_index.pt')
    monkeypatch.setattr(pools.RecordPool, 'index_records', None)
    assert torch.equal(pools.open_pool(rec).offsets, pool.offsets)


def test_record_pool_without_header(tmp_path):
    """No header record: every record of the .idx is an image, record 0 included; a record with flag > 0 that
    holds an image (landmarks as labels) is an image too."""
    rec = write_rec(tmp_path, [pack(0.0, image_bytes(1)), pack((1.0, 2.0), image_bytes(2)), pack(5.0, b'junk')])
    pool = pools.open_pool(rec)
    assert len(pool) == 3 and pool.read(1).getpixel((0, 0)) == (2, 253, 7)
    with pytest.raises(OSError):
        pool.read(2)


def test_record_pool_rejects_damage(tmp_path):
    rec = write_rec(tmp_path, [pack(0.0, image_bytes(1)), pack(1.0, image_bytes(2))])
    index = (tmp_path / 'train.idx').read_text()
    (tmp_path / 'train.idx').write_text(index + '2\t999999\n')
    with pytest.raises(ValueError, match='past the end'):
        pools.open_pool(rec)
    (tmp_path / 'train.idx').write_text('0\t0\n1\t4\n')  # byte 4 is inside record 0
    with pytest.raises(ValueError, match='no record at byte 4'):
        pools.open_pool(rec).read(1)
    (tmp_path / 'train.idx').write_text(index)
    os.truncate(rec, os.path.getsize(rec) - 20)  # the last record is cut short
    with pytest.raises(ValueError, match='cut short'):
        pools.open_pool(rec, reindex=True).read(1)  # reindex: the .idx changed within one tick of its cache
    (tmp_path / 'train.idx').write_text('0 zero\n')
    with pytest.raises(ValueError, match='expected lines'):
        pools.open_pool(rec, reindex=True)


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED, 'lfw112_rec')),
                    reason=f'needs the research copy of LFW as MXNet RecordIO in {os.path.normpath(SHARED)}/lfw112_rec')
def test_record_pool_mxnet_file(tmp_path):
    """The file MXNet 1.9.1 wrote: header labels [2001, 2935], images 1..2000, identity records 2001..2934."""
    for name in ('train.rec', 'train.idx'):  # linked, so that the index cache is written here, not in shared/
        os.symlink(os.path.join(SHARED, 'lfw112_rec', name), tmp_path / name)
    pool = pools.open_pool(str(tmp_path))
    assert len(pool) == 2000 and pool.keys[0] == 1 and pool.keys[-1] == 2000
    first, last = pool.read(0), pool.read(1999)
    assert first.size == last.size == (112, 112) and first.mode == 'RGB'
    identities = [pools.unpack_record(pool.payload(offset))[0] for offset in pool.offsets.tolist()]
    assert identities[:2] == [(0.0,), (1.0,)] and len(set(identities)) == 934 and identities == sorted(identities)
    # the records are lfw112's images in sorted path order
    with tarfile.open(os.path.join(SHARED, 'lfw112.tar')) as tar:
        name = min(m.name for m in tar if m.name.endswith('.jpg'))
        expected = Image.open(io.BytesIO(tar.extractfile(name).read())).convert('RGB')
    assert max(high for _, high in ImageChops.difference(first, expected).getextrema()) <= 2


def make_folder(root):
    for person, count in (('b_person', 2), ('a_person', 3)):
        os.makedirs(root / person / 'deeper', exist_ok=True)
        for k in range(count):
            Image.new('RGB', (8, 8), (k, 0, 0)).save(root / person / f'{k}.png')
    Image.new('RGB', (8, 8)).save(root / 'a_person' / 'deeper' / 'x.JPG')
    (root / 'notes.txt').write_text('not an image')


def test_folder_pool_index_and_cache(tmp_path, monkeypatch, home):
    root = tmp_path / 'pool'
    make_folder(root)
    pool = pools.open_pool(str(root))
    assert isinstance(pool, pools.FolderPool) and len(pool) == 6
    assert [os.path.relpath(pool.name(i), root) for i in range(len(pool))] == [
        'a_person/0.png', 'a_person/1.png', 'a_person/2.png', 'a_person/deeper/x.JPG', 'b_person/0.png',
        'b_person/1.png']
    assert pool.read(2).getpixel((0, 0)) == (2, 0, 0)
    assert pool.names.numel() + 8 * pool.ends.numel() < 100 * len(pool)
    assert os.path.isfile(root / pools.INDEX_FILE)

    def no_walk(root):
        raise AssertionError('walked the folder although its index is cached')
    index_folder = pools.index_folder
    monkeypatch.setattr(pools, 'index_folder', no_walk)
    assert len(pools.open_pool(str(root))) == 6  # warm start: the cache
    monkeypatch.setattr(pools, 'index_folder', index_folder)
    # a file added inside a subfolder is seen only on reindex; one added to root itself makes root newer
    Image.new('RGB', (8, 8)).save(root / 'a_person' / '3.png')
    assert len(pools.open_pool(str(root))) == 6
    assert len(pools.FolderPool(str(root), reindex=True)) == 7
    Image.new('RGB', (8, 8)).save(root / 'top.png')
    future = os.stat(root / pools.INDEX_FILE).st_mtime + 10  # coarse file-system clocks
    os.utime(root, (future, future))
    assert len(pools.open_pool(str(root))) == 8
    # a root we cannot write to (a folder where the cache file would go): the index goes to ~/.cache/dtm
    os.remove(root / pools.INDEX_FILE)
    os.mkdir(root / pools.INDEX_FILE)
    pool = pools.open_pool(str(root))
    assert len(pool) == 8 and os.listdir(home / '.cache' / 'dtm')
    monkeypatch.setattr(pools, 'index_folder', no_walk)
    assert len(pools.open_pool(str(root))) == 8


def test_folder_pool_odd_names_and_empty(tmp_path, monkeypatch):
    os.makedirs(tmp_path / 'odd')
    for name in (b'\xff\xfe.jpg', 'é 1.png'.encode()):  # not UTF-8, and non-ASCII with a space
        Image.new('RGB', (4, 4)).save(os.path.join(os.fsencode(tmp_path / 'odd'), name), 'PNG')
    pool = pools.open_pool(str(tmp_path / 'odd'))
    assert len(pool) == 2 and all(pool.read(i).size == (4, 4) for i in range(2))
    os.makedirs(tmp_path / 'empty' / 'sub')
    with pytest.raises(ValueError, match='no image files'):
        pools.open_pool(str(tmp_path / 'empty'))


def test_labeled_set_as_pool(tmp_path):
    """A labeled set contributes its train split only: its val images must never be trained on."""
    for split, n in (('train', 3), ('val', 2)):
        for c in ('happy', 'sad'):
            os.makedirs(tmp_path / split / c)
            for k in range(n):
                Image.new('RGB', (8, 8)).save(tmp_path / split / c / f'{k}.png')
    pool = pools.open_pool(str(tmp_path))
    assert isinstance(pool, pools.ListPool) and len(pool) == 6
    assert all('/train/' in pool.name(i) for i in range(6)) and pool.read(0).size == (8, 8)


def test_unlabeled_pool_skips_bad_files(tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'faces'
    os.makedirs(folder)
    for k in range(3):
        Image.new('RGB', (8, 8), (k, 0, 0)).save(folder / f'{k}_good.png')
    (folder / '0_corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0' + os.urandom(300))
    jpeg = image_bytes(5, 'JPEG', size=64)
    (folder / '1_truncated.jpg').write_bytes(jpeg[:len(jpeg) // 2])
    (folder / '2_text.png').write_text('hello, I am not a picture')
    rec = write_rec(tmp_path, insightface_payloads([image_bytes(40), b'not an image', image_bytes(50)]))
    pool = data.UnlabeledPool([pools.open_pool(str(folder)), pools.open_pool(rec)], data.Decode(16))
    assert len(pool) == 6 + 3
    results = [pool[i] for i in range(len(pool))]
    # folder order: 0_corrupt 0_good 1_good 1_truncated 2_good 2_text | record 1, 2 (bad), 3
    assert [r[1] for r in results] == [1, 1, 2, 4, 4, 6, 6, 8, 8]
    assert [r[2] for r in results] == [1, 0, 0, 1, 0, 1, 0, 1, 0]
    assert results[0][0].shape == (3, 16, 16) and results[0][0].dtype == torch.uint8
    err = capsys.readouterr().err
    assert all(s in err for s in ('0_corrupt.jpg', '1_truncated.jpg', '2_text.png', 'train.rec record 2'))
    # through forked DataLoader workers; skipped counts add up
    loader = data.loader(pool, 9, data.InfiniteSampler(len(pool), seed=0), workers=2)
    images, index, skipped = next(iter(loader))
    assert sorted(index.tolist()) == [1, 1, 2, 4, 4, 6, 6, 8, 8] and skipped.sum() == 4
    # decoded once into memory: the same items, each bad file replaced by the next good one, and counted
    kept = loading.in_memory(pool, workers=2)
    assert len(kept) == len(pool) and kept.unreadable == 4
    for i in range(len(pool)):
        image, index, skipped = kept[i]
        assert torch.equal(image, results[i][0]) and (index, skipped) == results[i][1:], i
    only_bad = data.UnlabeledPool([pools.open_pool(str(folder))], data.Decode(16))
    only_bad.sources[0].read = lambda i: Image.open(io.BytesIO(b'bad'))
    with pytest.raises(RuntimeError, match='100 unreadable'):
        only_bad[0]


def test_describe_reads_a_small_pool_in_full(tmp_path, monkeypatch, capsys):
    """python tools/inspect_data.py POOL: how many files open as images, and why the others do not, counted by reason."""
    folder = tmp_path / 'faces'
    os.makedirs(folder)
    for k in range(3):
        Image.new('RGB', (8, 8), (k, 0, 0)).save(folder / f'{k}_good.png')
    for k in range(2):
        (folder / f'{k}_text.png').write_text(f'not a picture, number {k}')
    found = inspect_data.describe(str(folder), workers=2)
    assert found['images'] == 5 and found['checked'] and found['readable'] == 3
    (reason, count), = found['unreadable'].items()
    assert count == 2 and 'cannot identify image file' in reason and found['examples'][reason].endswith('_text.png')
    text = inspect_data.describe_text(found)
    assert '5 images; all read: 3 open as images, 2 do not' in text and f'2: {reason}' in text
    monkeypatch.setattr(inspect_data, 'CHECK_UP_TO', 4)  # a larger pool: counted, not read, unless asked
    found = inspect_data.describe(str(folder))
    assert not found['checked'] and 'readable' not in found and 'not read' in inspect_data.describe_text(found)
    assert inspect_data.describe(str(folder), check_all=True)['readable'] == 3
    capsys.readouterr()
    monkeypatch.setattr(sys, 'argv', ['inspect_data.py', str(tmp_path / 'none')])  # a bad path: one line, exit status 1
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(os.path.join(ROOT, 'tools', 'inspect_data.py'), run_name='__main__')
    out, err = capsys.readouterr()
    assert exit.value.code == 1 and out == '' and err.splitlines() == [f'{tmp_path / "none"}: no such file or folder']


def test_jpeg_bytes_decoded_in_the_training_process_match_pil(tmp_path):
    """fast/gpu_decode.py's path, here on the CPU: workers read bytes, the batch is decoded at once
    (torchvision.io.decode_jpeg) and sized as data.Decode sizes a PIL image. The same items as the pool's own reading,
    the same images within rounding; a PNG, a grey JPEG and a damaged JPEG (replaced by the next readable image,
    counted) included."""
    from fast import gpu_decode
    folder = tmp_path / 'pool'
    os.makedirs(folder)
    generator = torch.Generator().manual_seed(0)
    for k in range(10):
        size = (40, 40) if k % 2 else (64, 48)
        noise = torch.randint(0, 256, (size[1] // 8, size[0] // 8, 3), generator=generator).to(torch.uint8).numpy()
        image = Image.fromarray(noise).resize(size, Image.BILINEAR)  # smooth: JPEG's rounding stays small
        if k == 3:
            image = image.convert('L')
        image.save(folder / (f'{k:02d}.png' if k == 5 else f'{k:02d}.jpg'), quality=90)
    (folder / '07.jpg').write_bytes(gpu_decode.JPEG_START + b'\x00 not the rest of a JPEG')
    for grey in (False, True):
        pool = data.UnlabeledPool([pools.open_pool(str(folder))], data.Decode(32, grey=grey))
        by_bytes = gpu_decode.PoolBytes(pool)
        assert sum(by_bytes[i][0].dim() == 1 for i in range(len(pool))) == 9  # the PNG comes decoded
        images, index, skipped = gpu_decode.decode_batch([by_bytes[i] for i in range(len(pool))], pool, 'cpu')
        expected = [pool[i] for i in range(len(pool))]
        assert index.tolist() == [e[1] for e in expected] and skipped.tolist() == [e[2] for e in expected]
        assert skipped.tolist()[7] == 1 and index.tolist()[7] == 8
        for k, (image, _, _) in enumerate(expected):
            difference = (images[k].int() - image.int()).abs()
            assert images[k].shape == (3, 32, 32) and difference.float().mean() < 1 and difference.max() <= 8, k
        streamed = next(loading.batches(by_bytes, 5, data.InfiniteSampler(len(pool), seed=0), 2, 'cpu'))
        assert streamed[1].tolist() == [expected[i][1] for i in take_sampler(len(pool), 5)]


def take_sampler(size, n):
    return [i for _, i in zip(range(n), data.InfiniteSampler(size, seed=0))]
