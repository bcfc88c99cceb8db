"""Train a segmentor with mmsegmentation / mmengine (the command line of mmseg's tools/train.py).

    python tools/train.py configs/bdd100k_pide_diffusion.py [--work-dir DIR] [--resume] [--amp [--amp-dtype bfloat16]]
    bash tools/dist_train.sh configs/bdd100k_pide_diffusion.py 4      # torchrun, 4 processes
"""
import argparse

from mmengine.runner import Runner

from pide_zoo.seg.cli import AMP_DTYPES, add_common_args, load_config


def main() -> None:
    parser = argparse.ArgumentParser(description='Train a segmentor')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--resume', action='store_true', help='resume from the latest checkpoint in the work dir')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision (CUDA)')
    parser.add_argument('--amp-dtype', choices=AMP_DTYPES, default='float16',
                        help='autocast dtype of --amp (default: %(default)s; the PIDE aggregate stays float32)')
    args = add_common_args(parser).parse_args()
    cfg = load_config(args, amp=args.amp, resume=args.resume, amp_dtype=args.amp_dtype)
    Runner.from_cfg(cfg).train()


if __name__ == '__main__':
    main()
