"""
JPEG pools decoded on the GPU: loader workers only read each file's bytes, and the training process decodes a batch
of them at once on the device (torchvision.io.decode_jpeg, nvJPEG), then sizes them as data.Decode does. A file that
is not a JPEG, or that fails to decode, is read the pool's own way (decoded with PIL, an unreadable file replaced by
the next readable one and counted), so a batch holds the same items as a streamed one.
"""
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from sources import pools

JPEG_START = b'\xff\xd8\xff'  # every JPEG file's first bytes: start of image, then a marker


def encoded_bytes(source, j):
    """The file bytes of image j of a pool source, or None where the source holds no encoded file for it."""
    if isinstance(source, pools.RecordPool):
        return pools.unpack_record(source.payload(source.offsets[j].item()))[1]
    path = source.path(j) if isinstance(source, pools.FolderPool) else getattr(source, 'items', [None] * (j + 1))[j]
    if not isinstance(path, str):
        return None
    with open(path, 'rb') as f:
        return f.read()


class PoolBytes(Dataset):
    """Item i of a data.UnlabeledPool as a loader worker gives it cheaply: (its JPEG bytes as a 1-d uint8 tensor, i,
    0) for a JPEG file, else the pool's own item (decoded image, index, skipped)."""

    def __init__(self, pool):
        self.pool = pool

    def __len__(self):
        return len(self.pool)

    def __getitem__(self, i):
        source, j = self.pool.locate(i)
        try:
            encoded = encoded_bytes(source, j)
        except (OSError, ValueError):
            encoded = None
        if encoded is not None and encoded[:3] == JPEG_START:
            return torch.frombuffer(bytearray(encoded), dtype=torch.uint8), i, 0
        return self.pool[i]


def as_list(items):
    """Collate: the items as they are (encoded bytes differ in length)."""
    return items


def decode_batch(items, pool, device):
    """(uint8 images (N, 3, S, S), index, skipped) on `device` for a batch of PoolBytes items: the JPEGs decoded
    together on the device, the others (and any JPEG that fails) as the pool decodes them."""
    encoded = [k for k, (image, _, _) in enumerate(items) if image.dim() == 1]
    images, index, skipped = [None] * len(items), [i for _, i, _ in items], [s for _, _, s in items]
    try:
        decoded = decode_jpeg([items[k][0] for k in encoded], mode=ImageReadMode.RGB, device=device) if encoded else []
    except RuntimeError:  # one damaged file fails the whole call: decode them one by one
        decoded = []
        for k in encoded:
            try:
                decoded.append(decode_jpeg(items[k][0], mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    for k, image in zip(encoded, decoded):
        if image is not None:
            images[k] = pool.decode.finish(image)
        else:  # as streaming: the pool reads it, or the next readable image
            images[k], index[k], skipped[k] = pool[index[k]]
    for k, (image, _, _) in enumerate(items):
        if image.dim() != 1:
            images[k] = image
    images = torch.stack([image.to(device) for image in images])
    return images, torch.tensor(index, device=device), torch.tensor(skipped, device=device)
