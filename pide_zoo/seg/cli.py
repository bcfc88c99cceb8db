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

__all__ = ['AMP_DTYPES', 'CPUDistributedDataParallel', 'add_common_args', 'load_config']


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
