"""
The built-in data: procedurally drawn faces whose brows, eyes and mouth encode the expression through the action
units of the Facial Action Coding System, built on the method's premise. The labeled set is small and posed: a few
people, frontal, evenly lit, unoccluded. The validation set and the unlabeled pool are faces of other people, "in the
wild": every degree of head pose, framing, shadow, background clutter and occlusion, from the posed look to the
hardest. These change how a face looks, not what its expression is (blur and sensor noise stay mild everywhere). The
labels alone cannot teach that variation; the pool shows it, and its easier faces carry the pseudo-labels over to the
harder ones. default_data() generates it once into data/faces in the ImageFolder layout, so the default run uses the
same loading code as real data, and draws it again whenever this file changes.

`python sources/faces.py --skewed-pool` adds a second pool with a face-recognition-like mix (mostly neutral and
happy), to see what such a pool does to the pseudo-labels.
"""
import argparse
import hashlib
import os
import random
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ('Neutral', 'Anger', 'Disgust', 'Fear', 'Happiness', 'Sadness', 'Surprise', 'Other')  # ABAW order
# action units per class: brow raise (AU1+2), inner brow raise (AU1), brow lower (AU4), lids up (AU5),
# lids tight (AU7), cheek raise (AU6), lip corners up (AU12), down (AU15), jaw drop (AU26), lip stretch (AU20),
# lip press (AU23/24), nose wrinkle + upper lip raise (AU9/10)
AUS = ('brows_up', 'inner', 'lower', 'lids_up', 'lids_tight', 'cheek', 'smile', 'frown', 'jaw', 'stretch', 'press',
       'wrinkle')
PROTOTYPES = {
    'Neutral': {},
    'Anger': dict(lower=1.0, lids_up=0.4, lids_tight=0.8, press=1.0),
    'Disgust': dict(wrinkle=1.0, frown=0.7, lower=0.3),
    'Fear': dict(brows_up=0.9, lower=0.6, lids_up=1.0, stretch=1.0, jaw=0.5),
    'Happiness': dict(cheek=1.0, smile=1.0),
    'Sadness': dict(inner=1.0, lower=0.4, frown=1.0, lids_tight=0.3),
    'Surprise': dict(brows_up=1.0, lids_up=1.0, jaw=1.0),
}
# class mix: imbalanced like real FER data; the skewed pool is dominated by neutral and happy faces, like
# face-recognition photos
LABELED_MIX = (0.20, 0.10, 0.08, 0.08, 0.18, 0.12, 0.12, 0.12)
SKEWED_MIX = (0.45, 0.04, 0.02, 0.02, 0.30, 0.05, 0.05, 0.07)
# the splits: images, people, class mix, and the range of the "wildness" each face is drawn at (0: frontal, evenly
# lit, unoccluded; 1: the strongest pose, framing, shadow, clutter and occlusion)
SPLITS = dict(train=(320, 4, LABELED_MIX, (0.0, 0.1)),
              val=(800, 80, LABELED_MIX, (0.0, 1.0)),
              unlabeled=(8000, 800, LABELED_MIX, (0.0, 1.0)))
SKEWED_POOL = (8000, 800, SKEWED_MIX, (0.0, 1.0))


def expression(label, rng):
    """Action-unit intensities for one face of class `label`: the prototype at a random intensity, plus noise.
    Other = a partial mixture of two expressions."""
    name = CLASSES[label]
    if name == 'Other':
        a, b = rng.sample([c for c in PROTOTYPES if c != 'Neutral'], 2)
        units = {u: 0.55 * rng.uniform(0.4, 1.0) * (PROTOTYPES[a].get(u, 0) + PROTOTYPES[b].get(u, 0)) for u in AUS}
    else:
        intensity = rng.uniform(0.85, 1.0)
        units = {u: intensity * PROTOTYPES[name].get(u, 0.0) for u in AUS}
    return {u: max(0.0, v + rng.gauss(0, 0.05)) for u, v in units.items()}


def new_identity(rng):
    """A person: face shape, colours and a resting face (some people look a little sad or surprised at rest)."""
    tone = rng.uniform(0.35, 1.0)
    return dict(skin=(int(120 + 120 * tone), int(80 + 110 * tone), int(60 + 100 * tone)),
                hair=tuple(rng.randint(10, 120) for _ in range(3)), hair_size=rng.uniform(0.05, 0.35),
                width=rng.uniform(0.56, 0.70), height=rng.uniform(0.72, 0.86), eye_y=rng.uniform(0.40, 0.47),
                eye_gap=rng.uniform(0.15, 0.21), eye_size=rng.uniform(0.055, 0.07), mouth_y=rng.uniform(0.70, 0.76),
                mouth_w=rng.uniform(0.14, 0.19), brow_w=rng.uniform(2.5, 3.5),
                rest={u: max(0.0, rng.gauss(0, 0.05)) for u in AUS})


def draw_face(person, units, rng, size=48, wild=0.5):
    """The face at `size` px, its pose, framing, shadow, clutter and occlusion scaled by `wild` in [0, 1]."""
    S = 2 * size  # draw at twice the size, then downsample with antialiasing
    u = {k: v + person['rest'][k] for k, v in units.items()}
    background = tuple(rng.randint(0, 255) for _ in range(3))
    image = Image.new('RGB', (S, S), background)
    d = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, round(3 * wild))):  # background clutter
        x, y = rng.uniform(0, S), rng.uniform(0, S)
        d.rectangle((x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    cx, cy, w, h = S / 2, S / 2, person['width'] * S, person['height'] * S
    d.ellipse((cx - w / 2, cy - h / 2 - S * person['hair_size'] * 0.4, cx + w / 2, cy + h / 4), fill=person['hair'])
    d.ellipse((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=person['skin'])
    dark = tuple(max(0, c - 110) for c in person['skin'])
    ey, gap, er = person['eye_y'] * S, person['eye_gap'] * S, person['eye_size'] * S
    openness = max(0.15, 1 + 0.8 * u['lids_up'] - 0.6 * u['lids_tight'] - 0.5 * u['cheek'])
    for side in (-1, 1):
        ex = cx + side * gap
        d.ellipse((ex - er * 1.3, ey - er * openness, ex + er * 1.3, ey + er * openness), fill=(250, 250, 250))
        pr = min(er * 0.7, er * openness)
        d.ellipse((ex - pr, ey - pr, ex + pr, ey + pr), fill=(30, 20, 20))
        if u['cheek'] > 0.3:  # AU6 cheek raiser: crow's feet and raised lower lids
            d.arc((ex - er * 1.6, ey - er, ex + er * 1.6, ey + er * 1.8), 20, 160, fill=dark, width=2)
        # brows: height from AU1+2 and AU4, inner end raised by AU1 and lowered/pulled in by AU4
        by = ey - er * 2.2 - S * 0.10 * u['brows_up'] + S * 0.06 * u['lower']
        inner = by - S * 0.09 * u['inner'] + S * 0.07 * u['lower']
        outer = by + S * 0.015 * u['inner']
        ix = cx + side * (gap * 0.45 - S * 0.02 * u['lower'])
        d.line((ix, inner, cx + side * (gap + er * 1.8), outer), fill=person['hair'], width=int(person['brow_w'] * 2))
    if u['wrinkle'] > 0.25:  # AU9 nose wrinkler
        for k in range(3):
            y = ey + er * 1.3 + k * 3
            d.line((cx - 5, y, cx + 5, y + 1), fill=dark, width=1)
    d.line((cx, ey + er, cx - 3, S * (person['mouth_y'] - 0.09)), fill=dark, width=2)
    # mouth: corners up (AU12) or down (AU15), width stretched (AU20) or pressed (AU23), jaw drop opens it (AU26)
    my, mw = person['mouth_y'] * S - S * 0.02 * u['wrinkle'], person['mouth_w'] * S * (1 + 0.45 * u['stretch'] + 0.25 * u['smile'] - 0.35 * u['press'])
    curve = S * (0.12 * u['smile'] - 0.10 * u['frown'])
    opening = S * (0.15 * u['jaw'] + 0.04 * u['stretch'])
    lips = (150, 50, 60) if u['press'] < 0.5 else (120, 60, 60)
    top = [(cx + mw * t, my - curve * t * t - S * 0.015 * u['wrinkle'] * (1 - t * t)) for t in (-1, -0.5, 0, 0.5, 1)]
    bottom = [(x, y + opening * (1 - ((x - cx) / mw) ** 2)) for x, y in reversed(top)]
    d.polygon(top + bottom, fill=(60, 15, 20) if opening > 2 else lips, outline=lips)
    d.line(top, fill=lips, width=max(2, int(5 - 3 * u['press'])))
    # pose, lighting, occlusion, blur and noise
    angle, shift = 3 + 37 * wild, 1 + 8 * wild
    image = image.rotate(rng.uniform(-angle, angle), resample=Image.BILINEAR,
                         translate=(rng.uniform(-shift, shift), rng.uniform(-shift, shift)), fillcolor=background)
    zoom = rng.uniform(1 - 0.2 * wild, 1 + 0.25 * wild)
    crop = S / zoom
    image = image.crop(((S - crop) / 2, (S - crop) / 2, (S + crop) / 2, (S + crop) / 2)).resize((S, S))
    if rng.random() < 0.25 * wild:  # occlusion (a hand, a microphone)
        d = ImageDraw.Draw(image)
        x, y = rng.uniform(0, S * 0.8), rng.uniform(S * 0.3, S * 0.9)
        d.ellipse((x, y, x + rng.uniform(15, 45), y + rng.uniform(15, 45)), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    shade = 1 - wild * rng.uniform(0.4, 0.8)  # the shadowed side keeps this share of its brightness
    light = Image.linear_gradient('L').rotate(rng.uniform(0, 360)).resize((S, S))
    image = Image.composite(image, Image.eval(image, lambda v: int(v * shade)), light.point(lambda v: 255 - v // 2))
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.5))).resize((size, size), Image.LANCZOS)
    generator = torch.Generator().manual_seed(rng.getrandbits(63))  # sensor noise, reproducible from the seed
    noise = (128 + rng.uniform(2, 6) * torch.randn(size * size, generator=generator)).clamp(0, 255).byte()
    return Image.blend(image, Image.frombytes('L', (size, size), bytes(noise.tolist())).convert('RGB'), 0.08)


def split_counts(shares, total):
    """Whole counts in proportion to shares that sum to total (largest remainder)."""
    counts = [int(share * total) for share in shares]
    by_remainder = sorted(range(len(shares)), key=lambda c: counts[c] - shares[c] * total)
    for c in by_remainder[:total - sum(counts)]:
        counts[c] += 1
    return counts


def write_split(folder, count, people, mix, wild, rng, name):
    """FOLDER/<class>/NAME_<i>.png: `count` faces of `people` new people in the class `mix`, each drawn at a
    wildness uniform in the range `wild`."""
    persons = [new_identity(rng) for _ in range(people)]
    labels = [c for c, n in enumerate(split_counts(mix, count)) for _ in range(n)]
    for c in CLASSES:
        os.makedirs(os.path.join(folder, c), exist_ok=True)
    for i, label in enumerate(labels):
        image = draw_face(rng.choice(persons), expression(label, rng), rng, wild=rng.uniform(*wild))
        image.save(os.path.join(folder, CLASSES[label], f'{name}_{i:05d}.png'))


def generate_faces(root, counts=None, identities=None, seed=0):
    """Write the built-in set: ROOT/train (labeled), ROOT/val and ROOT/unlabeled/<class>/ (the unlabeled pool; its
    class folders are only for inspection and pool_labels, the loader ignores them), each split with its own people.
    `counts` and `identities` override SPLITS' images and people per split. Written to a temporary folder and
    renamed, so an interrupted generation is never mistaken for a finished one."""
    rng = random.Random(seed)
    tmp = root + '.tmp'
    for i, (split, (count, people, mix, wild)) in enumerate(SPLITS.items()):
        write_split(os.path.join(tmp, split), counts[i] if counts else count, identities[i] if identities else people,
                    mix, wild, rng, split)
    with open(os.path.join(tmp, 'generator.sha256'), 'w') as f:
        f.write(generator_hash())
    os.replace(tmp, root)


def generator_hash():
    """The hash of this file: a set drawn by other code is drawn again."""
    with open(__file__, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def default_data(root='data/faces'):
    stamp = os.path.join(root, 'generator.sha256')
    if os.path.isdir(root) and not (os.path.exists(stamp) and Path(stamp).read_text() == generator_hash()):
        print(f'{root} was drawn by another version of sources/faces.py: drawing it again')
        shutil.rmtree(root)
    if not os.path.isdir(root):
        print(f'generating the built-in face-expression set into {root} (once) ...')
        generate_faces(root)
    pool_labels(root)
    return root


def skewed_pool(root='data/faces', seed=1):
    """ROOT/unlabeled_skewed: a second pool of new people, mostly neutral and happy like face-recognition photos."""
    folder = os.path.join(root, 'unlabeled_skewed')
    if not os.path.isdir(folder):
        write_split(folder + '.tmp', *SKEWED_POOL, random.Random(seed), 'unlabeled_skewed')
        os.replace(folder + '.tmp', folder)
    return folder


def pool_labels(root, pool='unlabeled'):
    """ROOT/<pool>_labels.csv, `file name,class` for every face of the pool, written from the class folders the
    generator drew them into: train.py logs how often its pseudo-labels are right, never trains on it."""
    path = os.path.join(root, f'{pool}_labels.csv')
    if not os.path.exists(path):
        rows = [f'{name},{c}\n' for c in CLASSES for name in sorted(os.listdir(os.path.join(root, pool, c)))]
        with open(path + '.tmp', 'w') as f:
            f.writelines(rows)
        os.replace(path + '.tmp', path)
    return path


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Generate the built-in set into data/faces (train.py does it too).')
    parser.add_argument('--skewed-pool', action='store_true', help='also the skewed pool, data/faces/unlabeled_skewed')
    if parser.parse_args().skewed_pool:
        root = default_data()
        folder = skewed_pool(root)
        print(f'python train.py --unlabeled {folder} --pool-labels {pool_labels(root, "unlabeled_skewed")}')
    else:
        default_data()
