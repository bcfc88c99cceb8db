"""Evaluate a checkpoint with mmsegmentation / mmengine (prints aAcc, mIoU, mAcc and the soft IoU sIoU).

    python tools/test.py configs/bdd100k_pide_diffusion.py work_dirs/.../iter_175000.pth [--tta] [--show-dir DIR]
    bash tools/dist_test.sh configs/bdd100k_pide_diffusion.py CHECKPOINT 4
"""
import argparse

from mmengine.runner import Runner

from pide_zoo.seg.cli import add_common_args, add_show_args, apply_show_args, apply_tta, load_config


def main() -> None:
    parser = argparse.ArgumentParser(description='Test (and eval) a segmentor checkpoint')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', help='folder to write the predicted label maps to')
    args = add_show_args(add_common_args(parser)).parse_args()
    cfg = load_config(args, checkpoint=args.checkpoint)
    apply_show_args(cfg, args)
    if args.tta:
        apply_tta(cfg, args.config)
    if args.out is not None:
        metrics = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
        for metric in metrics:
            if metric['type'] in ('IoUMetric', 'mmseg.IoUMetric'):  # the metric that writes label maps
                metric['output_dir'] = args.out
                metric['keep_results'] = True
    Runner.from_cfg(cfg).test()


if __name__ == '__main__':
    main()
