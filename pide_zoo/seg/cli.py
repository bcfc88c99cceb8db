"""What tools/train.py and tools/test.py share: mmseg's command line, turned into a Config."""
from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
from typing import Optional, Sequence

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS
from torch import nn

__all__ = ['AMP_DTYPES', 'CPUDistributedDataParallel', 'add_common_args', 'add_show_args', 'apply_show_args',
           'apply_tta', 'load_config']


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings of the config, key=value pairs (e.g. train_cfg.max_iters=10)')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher (torchrun: pytorch)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """mmengine's DDP wrapper for CPU processes over gloo: SyncBN layers (CUDA only; DDP refuses them on CPU)
    become BN first, with mmengine's ``revert_sync_batchnorm``; each process normalises with its own batch."""

    def __init__(self, module: nn.Module, **kwargs):
        syncbn = sum(isinstance(m, nn.SyncBatchNorm) or type(m).__name__ == 'SyncBatchNorm' for m in module.modules())
        if syncbn:
            module = revert_sync_batchnorm(module)
            print_log(f'CPU launch over gloo: {syncbn} SyncBN layers converted to BN (SyncBN needs CUDA)',
                      logger='current')
        super().__init__(module=module, **kwargs)


def _setup_cpu_distributed(cfg: Config, launcher: str) -> None:
    """DDP over gloo without GPUs: mmengine's init_dist and DDP wrapper assume one CUDA device per process."""
    if launcher != 'pytorch':
        raise SystemExit(f'--launcher {launcher} needs CUDA devices; on CPU use torchrun with --launcher pytorch')
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    cfg.model_wrapper_cfg = dict(type='CPUDistributedDataParallel', device_ids=None, broadcast_buffers=False,
                                 find_unused_parameters=cfg.get('find_unused_parameters', False))
    print_log('no CUDA device: DDP over the gloo backend on CPU', logger='current')


AMP_DTYPES = ('float16', 'bfloat16')


def load_config(args: argparse.Namespace, amp: bool = False, resume: bool = False,
                checkpoint: Optional[str] = None, argv: Optional[Sequence[str]] = None,
                amp_dtype: str = 'float16') -> Config:
    """The config of ``args.config`` with the command line applied, ready for ``Runner.from_cfg``; ``amp`` turns
    the ``OptimWrapper`` into mmengine's ``AmpOptimWrapper`` computing in ``amp_dtype`` (float16 or bfloat16)."""
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if not osp.isfile(args.config):
        raise FileNotFoundError(f'config file {args.config!r} does not exist')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    if args.launcher != 'none' and not torch.cuda.is_available():
        _setup_cpu_distributed(cfg, args.launcher)
    if amp:
        if amp_dtype not in AMP_DTYPES:
            raise SystemExit(f'--amp-dtype must be one of {", ".join(AMP_DTYPES)}, got {amp_dtype!r}')
        if not torch.cuda.is_available():
            raise SystemExit('--amp needs a CUDA device (mmengine\'s AmpOptimWrapper); drop --amp on CPU')
        if cfg.optim_wrapper.type == 'AmpOptimWrapper':
            print_log('AMP training is already enabled in your config.', logger='current', level=logging.WARNING)
        elif cfg.optim_wrapper.type != 'OptimWrapper':
            raise SystemExit(f'--amp needs optim_wrapper.type OptimWrapper, got {cfg.optim_wrapper.type}')
        else:
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.dtype = amp_dtype
            if amp_dtype == 'float16':  # bfloat16 has float32's range: no loss scaling
                cfg.optim_wrapper.loss_scale = 'dynamic'
    cfg.resume = resume
    if checkpoint is not None:
        cfg.load_from = checkpoint
    return cfg


def add_show_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """mmseg's test.py display and test-time augmentation flags."""
    parser.add_argument('--show', action='store_true', help='show each prediction in a window')
    parser.add_argument('--show-dir', help='folder to write every test image painted with its prediction to')
    parser.add_argument('--wait-time', type=float, default=2, help='seconds each --show window stays')
    parser.add_argument('--tta', action='store_true',
                        help="test-time augmentation: the config's tta_pipeline and tta_model (mmseg's SegTTAModel)")
    return parser


def apply_show_args(cfg: Config, args: argparse.Namespace) -> None:
    """``--show`` / ``--show-dir`` as mmseg's test.py applies them, drawing every test image (mmseg's hook draws
    every 50th batch)."""
    if not (args.show or args.show_dir):
        return
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise SystemExit(f'--show and --show-dir need default_hooks.visualization (mmseg\'s SegVisualizationHook) '
                         f'in {args.config}')
    hook.update(draw=True, interval=1)
    if args.show:
        hook.update(show=True, wait_time=args.wait_time)
    if args.show_dir:
        cfg.visualizer.save_dir = args.show_dir


def apply_tta(cfg: Config, config: str) -> None:
    """Wrap the model in the config's ``tta_model`` and test with its ``tta_pipeline`` (mmseg's test.py --tta),
    keeping the model's own data preprocessor (mmengine hands the TTA model the top-level one)."""
    missing = [k for k in ('tta_pipeline', 'tta_model') if cfg.get(k) is None]
    if missing:
        raise SystemExit(f'--tta needs {" and ".join(missing)} in {config} (see mmseg\'s '
                         '_base_/datasets/*.py and _base_/default_runtime.py)')
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    cfg.tta_model.module = cfg.model
    if cfg.model.get('data_preprocessor') is not None:
        cfg.tta_model.data_preprocessor = cfg.model.data_preprocessor
    cfg.model = cfg.tta_model
