"""Test top-1/top-5 of checkpoints written by tools/train_cls.py, and their median as the paper reports it.

    python tools/eval_cls.py out/nl_c10_seed*/last.pth.tar --data-dir data --output nl_c10.json
    python tools/eval_cls.py out/nl_c10_seed1 out/nl_c10_seed2 --which best       # run folders

Each checkpoint rebuilds its own model (the recorded name and arguments) and subtracts its recorded
train-set mean; the dataset defaults to the one it was trained on.
"""
import argparse
import json
import os

import torch
from torch.utils.data import DataLoader

from pide_zoo.checkpoint import CheckpointError, load_models
from pide_zoo.cls import (
    DATASETS,
    SPLITS,
    DatasetCorruptError,
    DatasetNotFoundError,
    build_dataset,
    evaluate,
    median_summary,
)

CHECKPOINT_NAMES = {'last': 'last.pth.tar', 'best': 'model_best.pth.tar'}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('checkpoints', nargs='+', help='checkpoint files or run folders')
    p.add_argument('--which', default='last', help=f'checkpoint of a run folder: one of {tuple(CHECKPOINT_NAMES)}')
    p.add_argument('--data-dir', default='data', help='folder holding the torchvision dataset folders')
    p.add_argument('--dataset', default=None, help=f'one of {", ".join(DATASETS)} (default: the checkpoint\'s)')
    p.add_argument('--split', default='test', help=f'one of {SPLITS} (default: %(default)s)')
    p.add_argument('--download', action='store_true', help='download the dataset into --data-dir if missing')
    p.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights')
    p.add_argument('-b', '--batch-size', type=int, default=100)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--output', default='', help='write the results as JSON here')
    return p


def _resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    if args.which not in CHECKPOINT_NAMES:
        parser.error(f'--which must be one of {", ".join(CHECKPOINT_NAMES)}, got {args.which!r}')
    if args.split not in SPLITS:
        parser.error(f'--split must be one of {", ".join(SPLITS)}, got {args.split!r}')
    if args.dataset is not None and args.dataset not in DATASETS:
        parser.error(f'--dataset must be one of {", ".join(DATASETS)}, got {args.dataset!r}')
    paths = []
    for path in args.checkpoints:
        path = os.path.join(path, CHECKPOINT_NAMES[args.which]) if os.path.isdir(path) else path
        if not os.path.isfile(path):
            parser.error(f'checkpoint {path!r} does not exist')
        paths.append(path)
    return paths


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths = _resolve(parser, args)
    device = torch.device(args.device)
    results, datasets = [], {}
    try:  # every checkpoint is checked before anything is evaluated; one message names each bad file
        loaded = load_models(paths, use_ema=args.use_ema, device=device)
    except CheckpointError as e:
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    for path, (model, meta) in zip(paths, loaded):
        dataset = args.dataset or meta['dataset']
        if DATASETS[dataset].num_classes != meta['model_kwargs'].get('num_classes', DATASETS[dataset].num_classes):
            parser.error(f"{path} classifies {meta['model_kwargs']['num_classes']} classes, {dataset} has "
                         f'{DATASETS[dataset].num_classes}')
        key = (dataset, meta['data_mean'].numpy().tobytes())
        if key not in datasets:  # runs with the same data share one copy
            try:
                datasets[key] = build_dataset(dataset, args.split, args.data_dir, download=args.download,
                                              mean=meta['data_mean'], augment=False)
            except (DatasetNotFoundError, DatasetCorruptError) as e:
                parser.exit(2, f'{parser.prog}: error: {e}\n')
        loader = DataLoader(datasets[key], batch_size=args.batch_size, num_workers=args.workers)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        metrics = evaluate(model, loader, device, channels_last=args.channels_last)
        results.append(dict(checkpoint=path, model=meta['arch'], dataset=dataset, split=args.split,
                            epoch=meta['epoch'], seed=meta['args'].get('seed'), **metrics))
        print(f"{path}: {meta['arch']} {dataset}/{args.split} epoch {meta['epoch']}: "
              f"top1 {metrics['top1']:.2f} top5 {metrics['top5']:.2f} ({metrics['count']} images)", flush=True)
    summary = median_summary(results)
    print(f"median over {summary['runs']} checkpoint(s): top1 {summary['top1']['median']:.2f} "
          f"(mean {summary['top1']['mean']:.2f} +- {summary['top1']['std']:.2f}), "
          f"top5 {summary['top5']['median']:.2f}")
    out = dict(summary=summary, results=results)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, 'w') as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == '__main__':
    main()
