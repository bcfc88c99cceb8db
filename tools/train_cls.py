"""Train a timm classifier (the paper's networks or any other) on CIFAR-10/100, STL-10 or scikit-learn's digits.

Defaults are the recipe of Bohn, Griebel & Kannan (2021) with the authors' code filling its gaps (see
:mod:`pide_zoo.cls`); ``--config`` reads a YAML file of these options (``configs/cls/*.yaml``).
``--dataset digits`` without ``--config`` uses the short CPU recipe of ``configs/cls/<model>_digits.yaml``.

    python tools/train_cls.py --model nl_hamiltonian74 --dataset cifar10 --data-dir data --output out/nl_c10
    python tools/train_cls.py --model nl_hamiltonian74 --dataset digits   # no files needed, CPU, minutes
    torchrun --nproc_per_node 4 tools/train_cls.py -c configs/cls/hamiltonian74_cifar100.yaml -b 25
    python tools/train_cls.py ... --resume out/nl_c10/last.pth.tar                  # continue exactly

The output folder gets ``summary.json`` (final test top-1/top-5), ``summary.csv`` (one row per epoch),
``log.txt``, ``args.yaml`` and timm's checkpoints (``last.pth.tar``, ``model_best.pth.tar``, ...).
"""
import argparse
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from functools import partial

import timm
import torch
import yaml
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import resume_checkpoint
from timm.optim import create_optimizer_v2
from timm.utils import (
    ModelEmaV3,
    NativeScaler,
    ParseKwargs,
    distribute_bn,
    init_distributed_device,
    setup_default_logging,
    trim_summary,
    update_summary,
)
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from pide_zoo.checkpoint import CheckpointError, ClsCheckpointSaver, checkpoint_meta, plain, read_checkpoint
from pide_zoo.cls import (
    DATASETS,
    PAPER_RECIPES,
    PAPER_SCHEDULE,
    WD_PARAMS,
    DatasetCorruptError,
    DatasetNotFoundError,
    build_dataset,
    classifier_kwargs,
    create_lr_scheduler,
    evaluate,
    keras_l2_to_weight_decay,
    seed_epoch,
    train_one_epoch,
    weight_decay_param_groups,
)

_logger = logging.getLogger('train_cls')
CLS_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'cls')
DIGITS_RECIPE = 'nl_hamiltonian74_digits.yaml'  # the recipe of models without their own *_digits.yaml
SCHEDULERS = ('multistep', 'step', 'cosine', 'poly', 'constant', 'none')
AMP_DTYPES = ('float16', 'bfloat16')
EVAL_COLUMNS = ('loss', 'top1', 'top5', 'count')

config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
config_parser.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of option defaults')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of option defaults')
    g = p.add_argument_group('model and data')
    g.add_argument('--model', default='nl_hamiltonian74', help='timm model name (default: %(default)s)')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help="extra model arguments, e.g. depths='(1,1,1)' h=0.1")
    g.add_argument('--dataset', default='cifar10', help=f'one of {", ".join(DATASETS)} (default: %(default)s); digits '
                   'without --config: the recipe of configs/cls/<model>_digits.yaml (4 epochs)')
    g.add_argument('--data-dir', default='data', help='folder holding the torchvision dataset folders')
    g.add_argument('--download', action='store_true', help='download the dataset into --data-dir if missing')
    g.add_argument('-j', '--workers', type=int, default=2, help='data loader processes (default: %(default)s)')
    g.add_argument('--pin-mem', action='store_true', help='pin loader memory (CUDA)')
    g = p.add_argument_group('optimisation (defaults: the paper, see pide_zoo.cls)')
    g.add_argument('--epochs', type=int, default=PAPER_SCHEDULE['epochs'])
    g.add_argument('-b', '--batch-size', type=int, default=None,
                   help='per process; default 100 (STL-10: 50)')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, help='default: --batch-size')
    g.add_argument('--opt', default=PAPER_SCHEDULE['opt'], help="timm optimizer (default: %(default)s = SGD "
                   "with classical momentum, as Keras; timm's 'sgd' is Nesterov)")
    g.add_argument('--momentum', type=float, default=PAPER_SCHEDULE['momentum'])
    g.add_argument('--lr', type=float, default=PAPER_SCHEDULE['lr'])
    g.add_argument('--weight-decay', type=float, default=None,
                   help='SGD weight decay; default 2 * --keras-l2')
    g.add_argument('--keras-l2', type=float, default=None, help='Keras l2(reg); default 2e-4 (STL-10: 5e-4)')
    g.add_argument('--wd-params', default='conv', help=f'one of {WD_PARAMS}: decay conv weights only (the paper) '
                   'or every weight (timm)')
    g.add_argument('--smoothness', type=float, default=PAPER_SCHEDULE['smoothness'],
                   help='weight-smoothness decay alpha_2 of (4.8) (default: %(default)s)')
    g.add_argument('--smoothing', type=float, default=0.0, help='label smoothing (default: 0)')
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm')
    g.add_argument('--sched', default='multistep', help=f'one of {SCHEDULERS} (default: %(default)s)')
    g.add_argument('--decay-milestones', type=int, nargs='+', default=list(PAPER_SCHEDULE['decay_milestones']))
    g.add_argument('--decay-epochs', type=float, default=30, help="for --sched step")
    g.add_argument('--decay-rate', type=float, default=PAPER_SCHEDULE['decay_rate'])
    g.add_argument('--warmup-epochs', type=int, default=PAPER_SCHEDULE['warmup_epochs'])
    g.add_argument('--warmup-lr', type=float, default=PAPER_SCHEDULE['warmup_lr'])
    g.add_argument('--min-lr', type=float, default=0.0)
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (timm ModelEmaV3)')
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action='store_true')
    g = p.add_argument_group('run')
    g.add_argument('--output', default='', help='run folder (default: output/train_cls/<model>-<dataset>)')
    g.add_argument('--resume', default='', metavar='CHECKPOINT', help='continue a run from its checkpoint')
    g.add_argument('--checkpoint-hist', type=int, default=3, help='best checkpoints kept (default: %(default)s)')
    g.add_argument('--eval-every', type=int, default=1, help='test every N epochs and after the last')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--dist-backend', default=None, help='default: nccl on CUDA, gloo on CPU')
    g.add_argument('--amp', action='store_true', help='automatic mixed precision')
    g.add_argument('--amp-dtype', default='float16', help=f'one of {AMP_DTYPES} (default: %(default)s)')
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help='torch.compile the model (default backend: inductor)')
    g.add_argument('--no-progress', action='store_true', help='no progress bars')
    return p


def _read_config(parser: argparse.ArgumentParser, path: str) -> dict:
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as e:
        parser.error(f'--config: cannot read {path!r}: {e.strerror}')
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(cfg) - known)
    if unknown:
        parser.error(f'--config {path}: unknown option(s) {unknown}; allowed: {sorted(known)}')
    return cfg


def digits_recipe(model: str) -> str:
    """The YAML file whose options ``--dataset digits`` uses when no ``--config`` is given."""
    path = os.path.join(CLS_CONFIGS, f'{model}_digits.yaml')
    return path if os.path.isfile(path) else os.path.join(CLS_CONFIGS, DIGITS_RECIPE)


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """timm's two-step parse: YAML defaults from --config, then the command line.

    Without --config, ``--dataset digits`` takes its defaults from :func:`digits_recipe` (the paper's 200
    epochs are meant for CIFAR and STL-10); ``args.recipe_note`` then says so.
    """
    args_config, remaining = config_parser.parse_known_args(argv)
    if args_config.config:
        parser.set_defaults(**_read_config(parser, args_config.config))
    args = parser.parse_args(remaining)
    args.config, args.recipe_note = args_config.config, ''
    if not args.config and args.dataset == 'digits':
        args.config = digits_recipe(args.model)
        cfg = {k: v for k, v in _read_config(parser, args.config).items() if k not in ('model', 'dataset')}
        parser.set_defaults(**cfg)
        args = parser.parse_args(remaining)  # the command line still overrides the recipe
        args.config = digits_recipe(args.model)
        shown = ', '.join(f'{k} {getattr(args, k)}' for k in cfg)
        args.recipe_note = (f'--dataset digits without --config: the digits recipe of '
                            f'{os.path.relpath(args.config)} ({shown}); options on the command line override it')
    _resolve(parser, args)
    return args


def _resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the dataset-dependent defaults and reject bad values, naming the option and what it allows."""
    def choice(name, value, allowed):
        if value not in allowed:
            parser.error(f'--{name} must be one of {", ".join(map(str, allowed))}, got {value!r}')

    choice('dataset', args.dataset, tuple(DATASETS))
    choice('sched', args.sched, SCHEDULERS)
    choice('wd-params', args.wd_params, WD_PARAMS)
    choice('amp-dtype', args.amp_dtype, AMP_DTYPES)
    if not timm.is_model(args.model):
        parser.error(f'--model must be a timm model name (timm.list_models()), got {args.model!r}')
    for name in ('epochs', 'eval_every', 'checkpoint_hist'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    for name in ('lr', 'warmup_lr', 'momentum', 'smoothness', 'smoothing', 'min_lr', 'decay_rate'):
        if getattr(args, name) < 0:
            parser.error(f'--{name.replace("_", "-")} must be >= 0, got {getattr(args, name)}')
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        parser.error(f'--warmup-epochs must be in [0, --epochs={args.epochs}], got {args.warmup_epochs}')
    if args.workers < 0:
        parser.error(f'--workers must be >= 0, got {args.workers}')
    recipe = PAPER_RECIPES[args.dataset]
    args.batch_size = args.batch_size or int(recipe['batch_size'])
    args.validation_batch_size = args.validation_batch_size or args.batch_size
    if args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.weight_decay is not None and args.keras_l2 is not None:
        parser.error('give --weight-decay or --keras-l2, not both (weight decay = 2 * keras l2)')
    if args.weight_decay is None:
        args.keras_l2 = recipe['keras_l2'] if args.keras_l2 is None else args.keras_l2
        args.weight_decay = keras_l2_to_weight_decay(args.keras_l2)
    if args.weight_decay < 0:
        parser.error(f'--weight-decay must be >= 0, got {args.weight_decay}')
    args.output = args.output or os.path.join('output', 'train_cls', f'{args.model}-{args.dataset}')


def _loaders(args, train_set, test_set):
    sampler = DistributedSampler(train_set, num_replicas=args.world_size, rank=args.rank, shuffle=True,
                                 seed=args.seed)
    # A last batch of one sample would break batch norm; drop only that case.
    drop_last = len(sampler) % args.batch_size == 1
    train = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                       pin_memory=args.pin_mem, drop_last=drop_last)
    # Disjoint test shards per process, reduced by evaluate(): every image counts exactly once.
    shard = Subset(test_set, range(args.rank, len(test_set), args.world_size))
    test = DataLoader(shard, batch_size=args.validation_batch_size, shuffle=False, num_workers=args.workers,
                      pin_memory=args.pin_mem)
    return sampler, train, test


def _bar(loader, args, primary, desc):
    if args.no_progress or not primary:
        return loader, None
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(m):
        bar.set_postfix({k: f'{v:.4g}' for k, v in m.items() if k in ('loss', 'top1')}, refresh=False)
    return bar, update


def main(argv=None) -> dict:
    parser = build_parser()
    args = parse_args(parser, argv)
    start_time = time.time()
    device = init_distributed_device(args)
    primary = args.rank == 0
    if primary:
        os.makedirs(args.output, exist_ok=True)
    setup_default_logging(log_path=os.path.join(args.output, 'log.txt') if primary else '')
    recipe_note = vars(args).pop('recipe_note')  # not an option: args.yaml must stay a valid --config
    if recipe_note and primary:
        _logger.info(recipe_note)

    # Data: only the first process downloads, the others wait for it.
    try:
        if args.download and args.distributed and not primary:
            torch.distributed.barrier()
        train_set = build_dataset(args.dataset, 'train', args.data_dir, download=args.download and primary)
        if args.download and args.distributed and primary:
            torch.distributed.barrier()
        test_set = build_dataset(args.dataset, 'test', args.data_dir, mean=train_set.mean)
    except (DatasetNotFoundError, DatasetCorruptError) as e:  # the message names the file and the remedy
        parser.exit(2, f'{parser.prog}: error: {e}\n')
    sampler, train_loader, test_loader = _loaders(args, train_set, test_set)

    torch.manual_seed(args.seed)  # the same initial weights whatever the process count
    model_kwargs = classifier_kwargs(args.model, args.dataset, args.model_kwargs)
    model = timm.create_model(args.model, **model_kwargs)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay,
                                    param_group_fn=partial(weight_decay_param_groups, weight_decay=args.weight_decay,
                                                           which=args.wd_params))
    amp_dtype = getattr(torch, args.amp_dtype)
    amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    loss_scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 \
        and device.type == 'cuda' else None
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
        if args.model_ema else None

    start_epoch = 0
    if args.resume:
        try:
            ckpt = read_checkpoint(args.resume)
        except (CheckpointError, FileNotFoundError) as e:
            parser.exit(2, f'{parser.prog}: error: --resume {e}\n')
        if ckpt['arch'] != args.model or ckpt['model_kwargs'] != plain(model_kwargs):
            parser.exit(2, f"{parser.prog}: error: --resume {args.resume}: it holds {ckpt['arch']} "
                           f"{ckpt['model_kwargs']}, not --model {args.model} {plain(model_kwargs)}\n")
        start_epoch = resume_checkpoint(model, args.resume, optimizer=optimizer, loss_scaler=loss_scaler,
                                        log_info=primary)
        if model_ema is not None and 'state_dict_ema' in ckpt:
            model_ema.module.load_state_dict(ckpt['state_dict_ema'])
        del ckpt
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)

    lr_scheduler = create_lr_scheduler(
        optimizer, sched=args.sched, epochs=args.epochs, decay_milestones=args.decay_milestones,
        decay_rate=args.decay_rate, warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
        decay_epochs=args.decay_epochs, seed=args.seed)
    if lr_scheduler is not None and start_epoch > 0:
        lr_scheduler.step(start_epoch)
    loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss()

    saver = None
    summary_csv = os.path.join(args.output, 'summary.csv')
    if primary:
        meta = checkpoint_meta(args.model, model_kwargs, args.dataset, train_set.mean, args)
        saver = ClsCheckpointSaver(model=model, optimizer=optimizer, model_ema=model_ema, amp_scaler=loss_scaler,
                                   checkpoint_dir=args.output, recovery_dir=args.output,
                                   max_history=args.checkpoint_hist, meta=meta)
        if args.resume and os.path.abspath(os.path.dirname(args.resume)) == os.path.abspath(args.output):
            saver.load_state_dict_from_checkpoint(args.resume)
        trim_summary(summary_csv, start_epoch)
        with open(os.path.join(args.output, 'args.yaml'), 'w') as f:
            yaml.safe_dump(plain(vars(args)), f, sort_keys=False)
        _logger.info(f'{args.model} {model_kwargs}: {n_params / 1e6:.3f} M parameters; {args.dataset}: '
                     f'{len(train_set)} train / {len(test_set)} test images; {args.world_size} process(es) x '
                     f'batch {args.batch_size}; epochs {start_epoch}..{args.epochs - 1}; output {args.output}')

    run = dict(device=device, amp_autocast=amp_autocast, channels_last=args.channels_last)
    num_updates = start_epoch * len(train_loader)
    eval_metrics, ema_metrics, epoch = {}, {}, start_epoch - 1
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        seed_epoch(args.seed, epoch, args.rank)
        sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]['lr']
        loader, progress = _bar(train_loader, args, primary, f'epoch {epoch + 1}/{args.epochs} lr {lr:.3g}')
        train_metrics, num_updates = train_one_epoch(
            model, loader, optimizer, loss_fn, smoothness=args.smoothness, loss_scaler=loss_scaler,
            model_ema=model_ema, num_updates=num_updates, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
            progress=progress, **run)
        if args.distributed:
            distribute_bn(model, args.world_size, reduce=True)
        train_metrics['time'] = time.time() - epoch_start
        last = epoch + 1 == args.epochs
        eval_metrics, ema_metrics = {}, {}
        if last or (epoch + 1) % args.eval_every == 0:
            eval_metrics = evaluate(model, test_loader, distributed=args.distributed, **run)
            if model_ema is not None:
                ema_metrics = evaluate(model_ema.module, test_loader, distributed=args.distributed, **run)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, eval_metrics.get('top1'))
        if primary:
            # the same columns every epoch, empty where the test set was skipped (--eval-every)
            row = {k: eval_metrics.get(k, '') for k in EVAL_COLUMNS}
            if model_ema is not None:
                row.update({f'ema_{k}': ema_metrics.get(k, '') for k in EVAL_COLUMNS})
            update_summary(epoch, train_metrics, row, summary_csv, lr=lr)
            saver.save_checkpoint(epoch, metric=eval_metrics.get('top1'))
            test = f" | test loss {eval_metrics['loss']:.4f} top1 {eval_metrics['top1']:.2f} " \
                   f"top5 {eval_metrics['top5']:.2f}" if eval_metrics else ''
            ema = f" | ema top1 {ema_metrics['top1']:.2f}" if ema_metrics else ''
            _logger.info(f"epoch {epoch + 1}/{args.epochs} lr {lr:.3g} | train loss {train_metrics['loss']:.4f} "
                         f"(smoothness {train_metrics['smooth']:.2e}) top1 {train_metrics['top1']:.2f}{test}{ema} | "
                         f"{train_metrics['time']:.1f} s")

    if not eval_metrics:  # nothing left to train (resumed a finished run): test the loaded weights
        eval_metrics = evaluate(model, test_loader, distributed=args.distributed, **run)
    summary = dict(
        model=args.model, model_kwargs=plain(model_kwargs), dataset=args.dataset, epochs=epoch + 1,
        top1=eval_metrics['top1'], top5=eval_metrics['top5'], loss=eval_metrics['loss'],
        test_images=eval_metrics['count'], params_m=round(n_params / 1e6, 4), seed=args.seed,
        batch_size=args.batch_size, world_size=args.world_size, device=str(device),
        wall_time_s=round(time.time() - start_time, 1), command=' '.join(sys.argv),
    )
    if ema_metrics:
        summary.update(ema_top1=ema_metrics['top1'], ema_top5=ema_metrics['top5'])
    if saver is not None and saver.best_metric is not None:
        summary.update(best_top1=saver.best_metric, best_epoch=saver.best_epoch)
    if primary:
        with open(os.path.join(args.output, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=2)
        _logger.info(f"final test top1 {summary['top1']:.2f} top5 {summary['top5']:.2f} "
                     f"({summary['wall_time_s']:.0f} s); {os.path.join(args.output, 'summary.json')}")
    if args.distributed:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == '__main__':
    main()
