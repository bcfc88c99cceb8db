"""Picture of the long-range demo: input, ground truth, local and nonlocal predictions, one row per image.

    python tools/train.py configs/demo_longrange_local.py
    python tools/train.py configs/demo_longrange.py
    python tools/demo_figure.py --out docs/figures/demo_longrange.png

The checkpoints default to the last ones of the two work dirs (``work_dirs/<config name>/last_checkpoint``);
the images are the first ``--num-images`` of the configs' validation split (generated if missing).
"""
import argparse
import os
import os.path as osp
import sys

import numpy as np

LOCAL_CONFIG = 'configs/demo_longrange_local.py'
NONLOCAL_CONFIG = 'configs/demo_longrange.py'


def last_checkpoint(config: str) -> str:
    """The checkpoint named by ``work_dirs/<config name>/last_checkpoint`` (mmengine's CheckpointHook)."""
    pointer = osp.join('work_dirs', osp.splitext(osp.basename(config))[0], 'last_checkpoint')
    if not osp.isfile(pointer):
        raise FileNotFoundError(f'{pointer!r} not found: train first with `python tools/train.py {config}` '
                                f'or pass the checkpoint')
    with open(pointer) as f:
        return f.read().strip()


def colorize(label: np.ndarray, palette) -> np.ndarray:
    return np.asarray(palette, np.uint8)[label]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--local-checkpoint', help=f'checkpoint of {LOCAL_CONFIG} (default: its last one)')
    parser.add_argument('--nonlocal-checkpoint', help=f'checkpoint of {NONLOCAL_CONFIG} (default: its last one)')
    parser.add_argument('--num-images', type=int, default=4, help='validation images, one row each')
    parser.add_argument('--data-root', help="the demo's data folder (default: the config's)")
    parser.add_argument('--out', default='docs/figures/demo_longrange.png', help='PNG to write')
    parser.add_argument('--device', default='cpu')
    args = parser.parse_args()
    if args.num_images < 1:
        parser.error(f'--num-images must be >= 1, got {args.num_images}')
    try:
        ckpts = [args.local_checkpoint or last_checkpoint(LOCAL_CONFIG),
                 args.nonlocal_checkpoint or last_checkpoint(NONLOCAL_CONFIG)]
    except FileNotFoundError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    for ckpt in ckpts:
        if not osp.isfile(ckpt):
            print(f'error: checkpoint {ckpt!r} does not exist', file=sys.stderr)
            return 2

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from mmcv import imread
    from mmseg.apis import inference_model
    from mmseg.registry import DATASETS

    from pide_zoo.checkpoint import load_model

    configs = (LOCAL_CONFIG, NONLOCAL_CONFIG)
    models = [load_model(ckpt, cfg, device=args.device)[0] for cfg, ckpt in zip(configs, ckpts)]
    dataset_cfg = models[1].cfg.val_dataloader.dataset.copy()
    dataset_cfg.pipeline = []
    if args.data_root is not None:
        dataset_cfg.data_root = args.data_root
    dataset = DATASETS.build(dataset_cfg)  # writes the demo's images on first use
    palette = dataset.metainfo['palette']
    rows = [dataset.get_data_info(i) for i in range(min(args.num_images, len(dataset)))]
    paths = [r['img_path'] for r in rows]
    preds = [[r.pred_sem_seg.data[0].cpu().numpy() for r in inference_model(m, paths)] for m in models]

    titles = ('input', 'ground truth', 'local network', 'nonlocal network')
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 0.7 * len(rows) + 0.35), squeeze=False)
    for i, row in enumerate(rows):
        gt = imread(row['seg_map_path'], flag='unchanged')
        panels = (imread(row['img_path'], channel_order='rgb'), colorize(gt, palette),
                  colorize(preds[0][i], palette), colorize(preds[1][i], palette))
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel, interpolation='nearest')
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=10)
    fig.tight_layout(pad=0.3)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f'wrote {args.out} ({len(rows)} images; checkpoints {ckpts[0]}, {ckpts[1]})')
    return 0


if __name__ == '__main__':
    sys.exit(main())
