"""What a :class:`~pide_zoo.layers.PIDEBlock` state dict records, and the checks made when one is loaded."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping

from timm.layers import make_divisible
from torch import nn

__all__ = ['RECORDED', 'PAPER_WIDTHS', 'reduced_width', 'settings', 'record_settings', 'check_loaded']

# The settings a state dict records (besides the batch norm's eps and momentum).
RECORDED = ('operator', 's', 'n', 'lam', 'kernel', 'kernel_params', 'kernel_scale', 'embed_scale', 'channels',
            'embed_channels', 'value_channels', 'stages', 'subsample', 'normalizer', 'symmetric', 'h')

# The paper's block (and every PIDEBlock before 0.3): theta and phi at C/2, full-width values through a C x C
# convolution per stage, no update scale.
PAPER_WIDTHS: Dict[str, Any] = dict(rd_ratio=0.5, rd_divisor=1, value_ratio=None, ls_init_value=None)

_warned_forms: set = set()


def reduced_width(channels: int, ratio: float, divisor: int) -> int:
    """channels * ratio as a width: timm's make_divisible, or with divisor 1 the rounding of every release before
    0.3 (the paper's C/2)."""
    return max(1, int(round(channels * ratio))) if divisor == 1 else make_divisible(channels * ratio, divisor)


def settings(block: nn.Module) -> Dict[str, Any]:
    out = {k: getattr(block, k) for k in RECORDED}
    bn = next((m for m in block.norms if isinstance(m, nn.modules.batchnorm._BatchNorm)), None)
    if bn is not None:
        out.update(bn_eps=float(bn.eps), bn_momentum=None if bn.momentum is None else float(bn.momentum))
    return out


def record_settings(block: nn.Module, state_dict, prefix: str, local_metadata: dict) -> None:
    local_metadata.update(settings(block))


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b))
    return a == b


def _widths(state_dict: Mapping[str, Any], prefix: str, channels: int):
    """(embedding width, value width, update scale?) of the block a state dict holds, or None if it holds none."""
    theta = state_dict.get(prefix + 'theta.weight')
    if theta is None:
        return None
    value = state_dict.get(prefix + 'value_proj.weight')
    return int(theta.shape[0]), channels if value is None else int(value.shape[0]), prefix + 'gamma' in state_dict


def check_widths(block: nn.Module, state_dict: Mapping[str, Any], prefix: str) -> None:
    """Refuse a state dict of a block with other widths, naming the arguments that rebuild it."""
    saved = _widths(state_dict, prefix, block.channels)
    ours = (block.embed_channels, block.value_channels, block.gamma is not None)
    if saved is None or saved == ours:
        return
    e, v, scale = saved
    rebuild = [f'rd_channels={e}', 'value_ratio=None' if v == block.channels else f'value_channels={v}',
               'ls_init_value=0.0' if scale else 'ls_init_value=None']
    paper_e = reduced_width(block.channels, PAPER_WIDTHS['rd_ratio'], PAPER_WIDTHS['rd_divisor'])
    old = ' (the widths of every PIDEBlock before pide_zoo 0.3 and of the paper: **PAPER_WIDTHS)' if (
        not scale and v == block.channels and e == paper_e) else ''
    raise RuntimeError(
        f'{prefix[:-1] or "PIDEBlock"}: this state dict holds a block with {e} embedding channels, '
        f'{v} value channels and {"an" if scale else "no"} update scale, but this block has {ours[0]}, {ours[1]} '
        f'and {"an" if ours[2] else "no"} update scale; build it with {", ".join(rebuild)}{old} to load it')


def check_loaded(block: nn.Module, state_dict: Mapping[str, Any], prefix: str, local_metadata: dict) -> None:
    """Refuse other widths; warn once when the recorded settings (or the kernel form) differ from the block's."""
    check_widths(block, state_dict, prefix)
    version = local_metadata.get('version')
    where = prefix[:-1] or 'PIDEBlock'
    if version is None or version < 3:
        _check_kernel_form(block, version, where, local_metadata)
        return
    ours = settings(block)
    # kernel_scale names the form; embed_scale is what the outputs depend on ('width' is 'paper' for some).
    # The batch norm is recorded, and compared by the paper's networks, which own it (one warning).
    diffs = [(k, local_metadata[k], ours[k]) for k in RECORDED if k in local_metadata and k != 'kernel_scale'
             and not _same(local_metadata[k], ours[k])]
    if any(k == 'embed_scale' for k, _, _ in diffs):
        diffs.insert(0, ('kernel_scale', local_metadata.get('kernel_scale'), ours['kernel_scale']))
    key = repr(diffs)  # kernel_params are dicts: not hashable
    if diffs and key not in _warned_forms:
        _warned_forms.add(key)
        warnings.warn(
            f'{where}: this state dict was saved from a block with '
            f'{", ".join(f"{k}={a!r}" for k, a, _ in diffs)}, but this block has '
            f'{", ".join(f"{k}={b!r}" for k, _, b in diffs)}; build it with the saved settings (its '
            f'block_cfg) to get the outputs it was trained for', UserWarning, stacklevel=3)


def _check_kernel_form(block: nn.Module, version, where: str, local_metadata: dict) -> None:
    # Release 0.1 computed the paper's kernel; 0.2 recorded the kernel form only; metadata-free state dicts
    # (timm's loaders strip it) say nothing.
    trained = 1.0 if version == 1 else local_metadata.get('embed_scale')
    if trained is None or abs(trained - block.embed_scale) <= 1e-6 * block.embed_scale:
        return
    form = 'paper' if version == 1 else local_metadata.get('kernel_scale')
    key = (block.operator, trained, block.embed_scale)
    if key in _warned_forms:
        return
    _warned_forms.add(key)
    if form == block.kernel_scale:  # same form, other scale: the operator or the width differ (0.2 did not say)
        advice = ('the operator or the embedding width differ from those it was saved with (pide_zoo 0.2 '
                  'recorded neither); build the block as it was saved')
    else:
        advice = f'pass kernel_scale={form!r} to the block (its block_cfg) to get the outputs it was trained for'
    warnings.warn(
        f'{where}: this state dict was trained with kernel_scale={form!r} (embed_scale {trained:g}'
        f'{", pide_zoo 0.1" if version == 1 else ""}) but the block computes kernel_scale={block.kernel_scale!r} '
        f'(embed_scale {block.embed_scale:g}); {advice}', UserWarning, stacklevel=4)
