"""Write the paper's 160x90 copy of BDD100K 10k semantic segmentation.

    python tools/prepare_bdd100k.py --src data/bdd100k --dst data/bdd100k_160x90

``--src`` holds the official folders images/10k/{train,val}/*.jpg and labels/sem_seg/masks/{train,val}/*.png.
Every second row and column is dropped three times (1280x720 -> 160x90), labels the same way; the
train split's per-pixel mean is written to DST/mean_image.npy for the configs' preprocessor.
Re-running keeps what is already written (--overwrite redoes it).
"""
import argparse
import sys
import time

from pide_zoo.data.bdd100k import LayoutError, prepare_bdd100k


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--src', default='data/bdd100k', help='official BDD100K folder (default: %(default)s)')
    parser.add_argument('--dst', default='data/bdd100k_160x90', help='output folder (default: %(default)s)')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'], choices=['train', 'val'])
    parser.add_argument('--workers', type=int, default=0, help='worker processes (0: in this process)')
    parser.add_argument('--jpeg-quality', type=int, default=95, help='quality of the written images')
    parser.add_argument('--overwrite', action='store_true', help='rewrite files that already exist')
    args = parser.parse_args()
    start = time.time()
    try:
        counts = prepare_bdd100k(args.src, args.dst, args.splits, args.workers, args.overwrite, args.jpeg_quality)
    except LayoutError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    print(f'wrote {", ".join(f"{n} {s}" for s, n in counts.items())} pairs to {args.dst} '
          f'in {time.time() - start:.1f}s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
