"""Write the paper's 160x90 copy of BDD100K 10k semantic segmentation.

    python tools/prepare_bdd100k.py --src data/bdd100k --dst data/bdd100k_160x90

``--src`` holds the official folders images/10k/{train,val}/*.jpg and labels/sem_seg/masks/{train,val}/*.png.
Every second row and column is dropped three times (1280x720 -> 160x90), labels the same way; the
train split's per-pixel mean is written to DST/mean_image.npy for the configs' preprocessor.
Bad source files (unreadable, truncated, of another size, with label values outside 0-18 and 255, or
without their partner) are named one per line; all the others are converted and the exit status is 2.
Outputs are written atomically; a rerun converts only what is missing (--overwrite redoes it all).
"""
import argparse
import sys
import time

from bdd100k_converter import LayoutError, convert_bdd100k  # beside this file: python puts its folder on the path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--src', default='data/bdd100k', help='official BDD100K folder (default: %(default)s)')
    parser.add_argument('--dst', default='data/bdd100k_160x90', help='output folder (default: %(default)s)')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'], choices=['train', 'val'])
    parser.add_argument('--workers', type=int, default=0, help='worker processes (0: in this process)')
    parser.add_argument('--jpeg-quality', type=int, default=95, help='quality of the written images')
    parser.add_argument('--overwrite', action='store_true', help='rewrite files that already exist')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    start = time.time()
    try:
        s = convert_bdd100k(args.src, args.dst, args.splits, args.workers, args.overwrite, args.jpeg_quality,
                            progress=not args.no_progress)
    except LayoutError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for problem in s.problems:
        print(f'bad file: {problem}', file=sys.stderr)
    done = s.done
    print(f'{args.dst}: ' + ', '.join(f'{done[k]} of {n} {k} pairs' for k, n in s.pairs.items())
          + f' (wrote {sum(s.written.values())}, kept {sum(s.kept.values())} already there) '
          f'in {time.time() - start:.1f}s'
          + (f'; {s.mean_image} averages {s.mean_of} train images' if s.mean_image else ''))
    if s.problems:
        missing = sum(s.pairs.values()) - sum(done.values())
        print(f'error: {len(s.problems)} bad source file(s), listed above; {missing} pair(s) not converted. '
              'Replace or remove them and rerun: only the missing pairs are converted.', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
