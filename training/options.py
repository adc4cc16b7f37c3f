"""
train.py's command line: the method's settings, the run's, and the variants measured against them.
"""
import argparse

from model import ARCHS
from sources import formats


def parser(description):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    method = parser.add_argument_group('method')
    method.add_argument('--threshold', default='dtm', choices=('dtm', 'fixed', 'flexmatch', 'freematch', 'none'),
                        help='pseudo-label threshold: dtm, fixed (FixMatch), flexmatch, freematch; none = supervised '
                        'only')
    method.add_argument('--tau', type=float, default=0.95, help='T_max of the DTM; the fixed and FlexMatch threshold')
    method.add_argument('--dtm-min', type=float, default=0.7, help='T_min: the lowest DTM threshold')
    method.add_argument('--dtm-momentum', type=float, default=0.99, help='m: EMA momentum of the DTM')
    method.add_argument('--dtm-relative', action='store_true', help='T(c) = T_max kappa(c) / max kappa (dtm.py)')
    method.add_argument('--lambda-u', type=float, default=1.0, help='weight of the unlabeled loss')
    method.add_argument('--lambda-u-warmup', type=int, default=200, help='steps over which the weight of the unlabeled '
                        'loss ramps up linearly to --lambda-u (0: none)')
    method.add_argument('--mu', type=int, default=3, help='unlabeled images per labeled image')
    run = parser.add_argument_group('run')
    run.add_argument('--data', help='labeled set root (default: the built-in faces, generated into data/faces)')
    run.add_argument('--format', choices=formats.FORMATS, help='format of --data (default: detected)')
    run.add_argument('--unlabeled', nargs='*', help='unlabeled sources: folder trees of images, InsightFace train.rec '
                     '(or its folder), labeled sets (train split, labels unused); default: the built-in pool')
    run.add_argument('--reindex', action='store_true', help='rebuild the cached index of the unlabeled folders')
    run.add_argument('--arch', default='resnet18', choices=ARCHS)
    run.add_argument('--weights', help='local backbone state dict to start from (its fc is replaced)')
    run.add_argument('--img-size', type=int, default=48, help='input size in pixels (faces are resized to it)')
    run.add_argument('--steps', type=int, default=500)
    run.add_argument('--batch-size', type=int, default=16, help='labeled images per step, per GPU')
    run.add_argument('--lr', type=float, default=0.03)
    run.add_argument('--lr-warmup', type=int, default=100, help='steps of linear learning-rate warm-up (0: none)')
    run.add_argument('--weight-decay', type=float, default=5e-4)
    run.add_argument('--ema', type=float, default=0.999, help='decay of the weight EMA that is evaluated and saved')
    run.add_argument('--eval-every', type=int, default=100)
    run.add_argument('--save-every', type=int, default=100)
    run.add_argument('--log-every', type=int, default=25)
    run.add_argument('--workers', type=int, help='processes per loader (default: 2; on a GPU the cores, split between '
                     'the streams by the images each decodes)')
    run.add_argument('--in-memory', nargs='?', const='yes', default='auto', choices=('auto', 'yes', 'no'),
                     help='yes: decode the labeled set and the pool once and keep them as tensors (on the GPU when '
                     'they fit); no: stream them through loader workers; auto (default): yes on a GPU for each one '
                     'that takes at most a quarter of its free memory, else no')
    run.add_argument('--decode-on-device', action='store_true', help='a streamed unlabeled pool of JPEG files is '
                     'decoded on the GPU, its loader workers only read the bytes')
    run.add_argument('--pool-labels', help='CSV of file name,class for the unlabeled pool: never trained on, only used '
                     'to log how often the pseudo-labels are right (labeled sets given as --unlabeled carry their own)')
    run.add_argument('--seed', type=int, default=0)
    run.add_argument('--out', default='runs/default')
    run.add_argument('--resume', nargs='?', const='last', help='checkpoint to resume (bare flag: OUT/last.pt)')
    run.add_argument('--compile', action='store_true', help='torch.compile the model')
    variants = parser.add_argument_group('variants')
    variants.add_argument('--grey', action='store_true', help='every image grey: a grey labeled set (FER2013) with '
                          'colour unlabeled faces')
    variants.add_argument('--own-bn', action='store_true', help='strong views are trained under their own batch '
                          'statistics, the running ones (the teacher, evaluation) are set by labeled images only: for '
                          'unlabeled faces from another domain (face-recognition photos)')
    variants.add_argument('--teacher', default='live', choices=('live', 'ema'),
                          help='who makes the pseudo-labels: the live model (FixMatch) or its weight EMA')
    variants.add_argument('--balanced', action='store_true', help='class-balanced sampling of the labeled set')
    return parser
