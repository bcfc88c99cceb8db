"""Forward-propagation stability: feature-norm growth through the blocks and the output change under small
input perturbations (random signs and FGSM), for Hamiltonian, nonlocal and ResNet networks side by side.

    python tools/stability.py out/ham_c10/last.pth.tar out/nl_c10/last.pth.tar out/r44_c10/last.pth.tar \\
        --data-dir data --output out/stability
    python tools/stability.py --models hamiltonian74 nl_hamiltonian74 resnet44_cifar --output stability_init

Writes ``stability.json``, ``feature_norms.png`` and ``sensitivity.png``. All networks see the same test
images (each with its own train-set mean subtracted); eps is in units of 1/255 of the [0, 1] pixel range.
"""
import argparse
import json
import os

import torch

from pide_zoo.analysis import feature_norms, perturbation_sensitivity, plot_feature_norms, plot_sensitivity
from pide_zoo.checkpoint import load_model, load_models
from pide_zoo.cls import DATASETS, load_split, per_pixel_mean


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('checkpoints', nargs='*', help='checkpoints of tools/train_cls.py')
    p.add_argument('--models', nargs='*', default=[], help='freshly initialised timm models to add')
    p.add_argument('--dataset', default=None,
                   help=f'one of {", ".join(DATASETS)} (default: the checkpoints\', else digits)')
    p.add_argument('--data-dir', default='data')
    p.add_argument('--num-images', type=int, default=200, help='test images used (default: %(default)s)')
    p.add_argument('--eps', type=float, nargs='+', default=[1, 2, 4, 8], help='perturbation sizes, x 1/255')
    p.add_argument('--use-ema', action='store_true')
    p.add_argument('--seed', type=int, default=0, help='image sample, random perturbations, --models initialisation')
    p.add_argument('--output', required=True, help='folder for the JSON and the figures')
    args = p.parse_args(argv)
    if not args.checkpoints and not args.models:
        p.error('give CHECKPOINT(s) and/or --models NAME ...')
    if args.num_images < 1 or any(e <= 0 for e in args.eps):
        p.error(f'--num-images and --eps must be positive, got {args.num_images} and {args.eps}')
    try:
        loaded = load_models(args.checkpoints, use_ema=args.use_ema)  # names every bad checkpoint at once
        datasets = {meta['dataset'] for _, meta in loaded}
        if args.dataset is None and len(datasets) > 1:
            p.error(f'the checkpoints were trained on different datasets {sorted(datasets)}; pick one with --dataset')
        dataset = args.dataset or (datasets.pop() if datasets else 'digits')
        if dataset not in DATASETS:
            p.error(f'--dataset must be one of {", ".join(DATASETS)}, got {dataset!r}')
        torch.manual_seed(args.seed)
        loaded += [load_model(model=m, dataset=dataset) for m in args.models]
        images, labels = load_split(dataset, args.data_dir, 'test')
        train_mean = None
        if any(meta['data_mean'] is None for _, meta in loaded):
            train_mean = per_pixel_mean(load_split(dataset, args.data_dir, 'train')[0])
    except (ValueError, FileNotFoundError) as e:  # bad checkpoints and data files: the message names them
        p.exit(2, f'{p.prog}: error: {e}\n')
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))[:args.num_images]
    x01 = torch.from_numpy(images[idx.numpy()]).float() / 255
    target = torch.from_numpy(labels[idx.numpy()])

    norms, sensitivity, models = {}, {}, {}
    for model, meta in loaded:
        label = f"{meta['arch']} (epoch {meta['epoch']})"
        label = label if label not in models else f'{label} #{len(models)}'
        mean = meta['data_mean'] if meta['data_mean'] is not None else train_mean
        x = x01 - mean
        norms[label] = feature_norms(model, x)
        sensitivity[label] = perturbation_sensitivity(model, x, target, eps=[e / 255 for e in args.eps],
                                                      seed=args.seed)
        models[label] = dict(source=meta['source'], arch=meta['arch'], model_kwargs=meta['model_kwargs'],
                             epoch=meta['epoch'], feature_norms=norms[label], sensitivity=sensitivity[label])
        s = sensitivity[label]
        worst = {k: rows[-1] for k, rows in s['perturbations'].items()}
        print(f"{label}: clean accuracy {s['clean_accuracy']:.1f}% | max block gain {max(norms[label]['gain']):.3f} | "
              + ' | '.join(f"{k} eps {args.eps[-1]:g}/255: logits change {r['logit_rel_change']:.3f}, "
                           f"accuracy {r['accuracy']:.1f}%" for k, r in worst.items()), flush=True)
    os.makedirs(args.output, exist_ok=True)
    figures = [plot_feature_norms(norms, os.path.join(args.output, 'feature_norms.png')),
               plot_sensitivity(sensitivity, os.path.join(args.output, 'sensitivity.png'))]
    result = dict(dataset=dataset, num_images=len(idx), eps_255=args.eps, seed=args.seed,
                  figures=[os.path.basename(f) for f in figures], models=models)
    with open(os.path.join(args.output, 'stability.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print(f'wrote {args.output}/stability.json, feature_norms.png and sensitivity.png')
    return result


if __name__ == '__main__':
    main()
