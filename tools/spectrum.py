"""Eigenvalues of the nonlocal blocks' 1x1 convolutions K_k and of their symmetric parts (Figures 7 and 8).

    python tools/spectrum.py out/nl_stl10/last.pth.tar --output out/nl_stl10/spectrum
    python tools/spectrum.py --model nl_hamiltonian74 --dataset stl10 --output spectrum_init   # at initialisation

Writes ``spectrum.json`` (eigenvalues and the fractions of positive values per block and K_k) and
``spectrum_real.png`` (Fig. 7), ``spectrum_sym.png`` (Fig. 8) and ``spectrum_complex.png``.
"""
import argparse
import json
import os

import torch
from timm.utils import ParseKwargs

from pide_zoo.analysis import nonlocal_spectra, plot_spectra
from pide_zoo.checkpoint import load_model
from pide_zoo.cls import DATASETS


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('checkpoint', nargs='?', help='checkpoint of tools/train_cls.py')
    p.add_argument('--model', default=None, help='a freshly initialised timm model instead of a checkpoint')
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='arguments of --model')
    p.add_argument('--dataset', default='cifar10', help=f'input geometry of --model: one of {", ".join(DATASETS)}')
    p.add_argument('--use-ema', action='store_true', help='the EMA weights of the checkpoint')
    p.add_argument('--fold-bn', action='store_true', help='analyse K scaled by its batch norm (eval mode)')
    p.add_argument('--seed', type=int, default=0, help='initialisation seed of --model')
    p.add_argument('--output', required=True, help='folder for the JSON and the figures')
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    if (args.checkpoint is None) == (args.model is None):
        p.error('give a CHECKPOINT or --model NAME (one of them)')
    if args.dataset not in DATASETS:
        p.error(f'--dataset must be one of {", ".join(DATASETS)}, got {args.dataset!r}')
    try:
        model, meta = load_model(args.checkpoint, args.model, args.model_kwargs, args.dataset, args.use_ema)
        spectra = nonlocal_spectra(model, fold_bn=args.fold_bn)
    except (ValueError, FileNotFoundError) as e:  # a bad checkpoint: the message names the file
        p.exit(2, f'{p.prog}: error: {e}\n')
    os.makedirs(args.output, exist_ok=True)
    title = f"{meta['arch']}, {meta['dataset']}, epoch {meta['epoch']}"
    figures = plot_spectra(spectra, os.path.join(args.output, 'spectrum_'), title=title)
    result = dict(source=meta['source'], arch=meta['arch'], model_kwargs=meta['model_kwargs'],
                  dataset=meta['dataset'], epoch=meta['epoch'], figures=[os.path.basename(f) for f in figures],
                  **spectra)
    with open(os.path.join(args.output, 'spectrum.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print(f'{title} ({meta["source"]})')
    for block in spectra['blocks']:
        for k, s in enumerate(block['stages'], 1):
            print(f"  {block['name']:<28} K{k} {s['size']:>4}x{s['size']:<4} positive: real parts "
                  f"{s['frac_pos_real']:.2f}, symmetric part {s['frac_pos_sym']:.2f} | "
                  f"spectral norm {s['spectral_norm']:.3f}")
    print(f'wrote {args.output}/spectrum.json and {", ".join(os.path.basename(f) for f in figures)}')
    return result


if __name__ == '__main__':
    main()
