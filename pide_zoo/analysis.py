"""Forward-propagation stability of trained networks (Bohn, Griebel & Kannan 2021, Sections 5.1 and 6.2).

- :func:`nonlocal_spectra`: eigenvalues of the 1x1 convolutions K_1, K_2 (..., K_S) of every nonlocal
  block and of their symmetric parts K_s = (K + K^T) / 2, with the fraction of positive (real parts of)
  eigenvalues, the "+" of Figures 7 and 8. Ideally close to 0.5: more positive values amplify the
  features, more negative ones damp them; x^T K x = x^T K_s x, so K_s decides amplification.
- :func:`feature_norms`: how the feature norm grows or decays through the blocks of a network.
- :func:`perturbation_sensitivity`: how much a small input perturbation (random signs or FGSM) changes
  each block's features and the output, the forward stability Hamiltonian networks are designed for.

Functions return plain dicts (JSON-ready); ``plot_*`` write PNG figures with matplotlib's Agg backend.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import HamiltonianBlock, PIDEBlock
from .models.cifar_resnet import BasicBlockV1, PreActBottleneck

__all__ = [
    'BLOCK_TYPES', 'PERTURBATIONS', 'nonlocal_blocks', 'matrix_spectrum', 'nonlocal_spectra', 'block_modules',
    'feature_norms', 'perturb', 'perturbation_sensitivity', 'plot_spectra', 'plot_feature_norms',
    'plot_sensitivity',
]

PERTURBATIONS = ('random', 'fgsm')


def _block_types() -> Tuple[Type[nn.Module], ...]:
    from timm.models.resnet import BasicBlock, Bottleneck

    return HamiltonianBlock, PIDEBlock, BasicBlockV1, PreActBottleneck, BasicBlock, Bottleneck


BLOCK_TYPES = _block_types()


def nonlocal_blocks(model: nn.Module) -> List[Tuple[str, PIDEBlock]]:
    """The :class:`PIDEBlock` modules of ``model`` with their names, in order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PIDEBlock)]


def matrix_spectrum(weight: Tensor) -> Dict[str, Any]:
    """Spectrum of a square matrix K (a 1x1 convolution's weight (C, C, 1, 1) is read as C x C).

    Returns the eigenvalues of K (``real``, ``imag``), the eigenvalues of its symmetric part (``sym``,
    ascending), the fraction of eigenvalues with positive real part (``frac_pos_real``, Figure 7's "+")
    and of positive symmetric-part eigenvalues (``frac_pos_sym``, Figure 8's "+"), and the spectral norm.
    Values within n * eps * ||K||_2 of zero count as zero, not positive.
    """
    k = weight.detach().reshape(weight.shape[0], -1).double().cpu()
    if k.shape[0] != k.shape[1]:
        raise ValueError(f'weight must be square (C, C[, 1, 1]), got {tuple(weight.shape)}')
    eig = torch.linalg.eigvals(k)
    order = torch.argsort(eig.real)
    eig = eig[order]
    sym = torch.linalg.eigvalsh((k + k.T) / 2)
    norm = torch.linalg.matrix_norm(k, ord=2).item()
    # Real parts within rounding of zero (a purely imaginary pair comes out as +-1e-17 or so, by LAPACK build
    # and processor) are zero, not positive.
    tol = k.shape[0] * torch.finfo(k.dtype).eps * norm
    return dict(
        size=k.shape[0], real=eig.real.tolist(), imag=eig.imag.tolist(), sym=sym.tolist(),
        frac_pos_real=(eig.real > tol).double().mean().item(), frac_pos_sym=(sym > tol).double().mean().item(),
        spectral_norm=norm,
    )


def nonlocal_spectra(model: nn.Module, fold_bn: bool = False) -> Dict[str, Any]:
    """:func:`matrix_spectrum` of K_1 .. K_S of every nonlocal block of ``model``.

    Args:
        model: a network with :class:`PIDEBlock` modules.
        fold_bn: analyse D K instead of K, D the diagonal scaling of the batch norm that follows K in eval
            mode (gamma / sqrt(running_var + eps)); the paper shows K itself.

    Returns:
        ``{'blocks': [{'name', 'channels', 'operator', 'stages': [spectrum of K_1, ...]}, ...]}``.
    """
    blocks = []
    for name, block in nonlocal_blocks(model):
        stages = []
        for conv, norm in zip(block.convs, block.norms):
            w = conv.weight.detach().reshape(conv.out_channels, -1).double()
            if fold_bn and isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_var is not None:
                scale = norm.running_var.double().add(norm.eps).rsqrt()
                if norm.weight is not None:
                    scale = scale * norm.weight.detach().double()
                w = scale[:, None] * w
            stages.append(matrix_spectrum(w))
        blocks.append(dict(name=name, channels=block.channels, operator=block.operator, stages=stages))
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no nonlocal blocks (PIDEBlock); nothing to analyse')
    return dict(fold_bn=fold_bn, blocks=blocks)


def block_modules(model: nn.Module, types: Optional[Sequence[Type[nn.Module]]] = None) -> List[Tuple[str, nn.Module]]:
    """The residual blocks of ``model`` (Hamiltonian, nonlocal, ResNet; not nested in one another), in order."""
    types = tuple(types or BLOCK_TYPES)
    found, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + '.') for p in inside):
            continue
        if isinstance(m, types):
            found.append((name, m))
            inside.add(name)
    if not found:
        raise ValueError(f'{type(model).__name__} has none of the block types {[t.__name__ for t in types]}')
    return found


class _Recorder:
    """Forward hooks keeping the output of each block of one forward pass."""

    def __init__(self, blocks: List[Tuple[str, nn.Module]]):
        self.outputs: Dict[str, Tensor] = {}
        self.inputs: Dict[str, Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in blocks]

    def _hook(self, name: str):
        def hook(module, args, output):
            if name not in self.outputs:  # the first call; ignore recomputations
                self.inputs[name] = args[0].detach()
                self.outputs[name] = output.detach()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _per_sample_norm(x: Tensor) -> Tensor:
    return x.flatten(1).double().norm(dim=1)


@torch.no_grad()
def _record(model: nn.Module, x: Tensor, blocks: List[Tuple[str, nn.Module]]) -> Tuple[Tensor, _Recorder]:
    rec = _Recorder(blocks)
    try:
        out = model(x)
    finally:
        rec.remove()
    return out, rec


def _kind(module: nn.Module) -> str:
    if isinstance(module, HamiltonianBlock):
        return 'hamiltonian'
    if isinstance(module, PIDEBlock):
        return 'nonlocal'
    return 'resnet'


def feature_norms(model: nn.Module, x: Tensor, types: Optional[Sequence[Type[nn.Module]]] = None) -> Dict[str, Any]:
    """Mean per-image L2 norms of each block's input and output features and their ratio (``gain``) on
    inputs ``x``, in eval mode; a stable forward propagation keeps the gains near 1."""
    model.eval()
    blocks = block_modules(model, types)
    out, rec = _record(model, x, blocks)
    result = dict(blocks=[], kinds=[], norm_in=[], norm_out=[], gain=[], rms_out=[])
    for name, m in blocks:
        if name not in rec.outputs:
            continue
        n_in, n_out = _per_sample_norm(rec.inputs[name]), _per_sample_norm(rec.outputs[name])
        result['blocks'].append(name)
        result['kinds'].append(_kind(m))
        result['norm_in'].append(n_in.mean().item())
        result['norm_out'].append(n_out.mean().item())
        result['gain'].append((n_out / n_in.clamp_min(1e-12)).mean().item())
        result['rms_out'].append((n_out / rec.outputs[name][0].numel() ** 0.5).mean().item())
    result['input_norm'] = _per_sample_norm(x).mean().item()
    result['logit_norm'] = _per_sample_norm(out).mean().item()
    return result


def perturb(model: nn.Module, x: Tensor, target: Tensor, eps: float, kind: str = 'fgsm',
            generator: Optional[torch.Generator] = None) -> Tensor:
    """A perturbation of L-infinity size ``eps``: random signs (``'random'``) or the fast gradient sign
    method (``'fgsm'``, eps * sign of the input gradient of the cross-entropy, Goodfellow et al. 2015).
    Both have the same L-infinity and L2 norms, so their effects compare directly."""
    if kind not in PERTURBATIONS:
        raise ValueError(f'kind must be one of {PERTURBATIONS}, got {kind!r}')
    if kind == 'random':
        signs = torch.randint(0, 2, x.shape, generator=generator, device='cpu').to(x.device, x.dtype) * 2 - 1
        return eps * signs
    model.eval()
    with torch.enable_grad():
        x_req = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x_req), target)
        (grad,) = torch.autograd.grad(loss, x_req)
    return eps * grad.sign()


def perturbation_sensitivity(
        model: nn.Module,
        x: Tensor,
        target: Tensor,
        eps: Sequence[float] = (1 / 255, 2 / 255, 4 / 255, 8 / 255),
        kinds: Sequence[str] = PERTURBATIONS,
        types: Optional[Sequence[Type[nn.Module]]] = None,
        seed: int = 0,
) -> Dict[str, Any]:
    """Effect of input perturbations delta (see :func:`perturb`) on every block and on the output, in eval mode.

    For each kind and eps: per block, the relative feature change ||F_j(x + delta) - F_j(x)|| / ||F_j(x)||
    (``rel_change``) and the amplification ||F_j(x + delta) - F_j(x)|| / ||delta|| (``gain``); for the
    output, the relative logit change, the accuracy and the fraction of changed predictions. Means over images.
    """
    for k in kinds:
        if k not in PERTURBATIONS:
            raise ValueError(f'kinds must hold values of {PERTURBATIONS}, got {k!r}')
    model.eval()
    blocks = block_modules(model, types)
    clean_out, clean = _record(model, x, blocks)
    kind_of = {n: _kind(m) for n, m in blocks if n in clean.outputs}
    names = list(kind_of)
    clean_pred = clean_out.argmax(1)
    result: Dict[str, Any] = dict(
        blocks=names, kinds=list(kind_of.values()), eps=list(eps),
        clean_accuracy=(clean_pred == target).double().mean().item() * 100, perturbations={})
    gen = torch.Generator().manual_seed(seed)
    for kind in kinds:
        rows = []
        for e in eps:
            delta = perturb(model, x, target, e, kind, generator=gen)
            out, rec = _record(model, x + delta, blocks)
            d_norm = _per_sample_norm(delta).clamp_min(1e-12)
            rel, gain = [], []
            for n in names:
                diff = _per_sample_norm(rec.outputs[n] - clean.outputs[n])
                rel.append((diff / _per_sample_norm(clean.outputs[n]).clamp_min(1e-12)).mean().item())
                gain.append((diff / d_norm).mean().item())
            pred = out.argmax(1)
            rows.append(dict(
                eps=e, rel_change=rel, gain=gain,
                logit_rel_change=(_per_sample_norm(out - clean_out) / _per_sample_norm(clean_out).clamp_min(
                    1e-12)).mean().item(),
                accuracy=(pred == target).double().mean().item() * 100,
                flipped=(pred != clean_pred).double().mean().item() * 100))
        result['perturbations'][kind] = rows
    return result


# --- figures -----------------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f'the plots need matplotlib, which is not installed ({e}); '
                          'pip install "pide_zoo[analysis]"') from e

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, rows: int, cols: int, size=(2.8, 2.2)):
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    return fig, axes


def plot_spectra(spectra: Dict[str, Any], prefix: str, title: str = '') -> List[str]:
    """Figures 7 and 8 from :func:`nonlocal_spectra`: ``<prefix>real.png`` (real parts of the eigenvalues
    of each K_k, sorted), ``<prefix>sym.png`` (eigenvalues of the symmetric parts) and
    ``<prefix>complex.png`` (eigenvalues in the complex plane); rows are nonlocal blocks, columns K_k.
    Returns the paths written."""
    plt = _pyplot()
    blocks = spectra['blocks']
    cols = max(len(b['stages']) for b in blocks)
    paths = []
    for what, key, frac in (('real', 'real', 'frac_pos_real'), ('sym', 'sym', 'frac_pos_sym'),
                            ('complex', None, 'frac_pos_real')):
        fig, axes = _grid(plt, len(blocks), cols)
        for i, block in enumerate(blocks):
            for j in range(cols):
                ax = axes[i][j]
                if j >= len(block['stages']):
                    ax.axis('off')
                    continue
                s = block['stages'][j]
                if key is None:
                    ax.scatter(s['real'], s['imag'], s=6, color='C0')
                    ax.axvline(0, color='0.6', lw=0.8)
                    ax.axhline(0, color='0.6', lw=0.8)
                    ax.set_xlabel('Re', fontsize=7)
                    ax.set_ylabel('Im', fontsize=7)
                else:
                    ax.scatter(range(len(s[key])), sorted(s[key]), s=6, color='C0' if key == 'real' else 'C1')
                    ax.axhline(0, color='0.6', lw=0.8)
                    ax.set_xlabel('index', fontsize=7)
                ax.set_title(f"{block['name']}  K{j + 1} ({s['size']}x{s['size']})", fontsize=7)
                ax.text(0.03, 0.92, f"+: {s[frac]:.2f}", transform=ax.transAxes, fontsize=8, va='top',
                        bbox=dict(facecolor='white', alpha=0.8, lw=0))
                ax.tick_params(labelsize=6)
        label = {'real': 'real parts of the eigenvalues of K (Fig. 7)',
                 'sym': 'eigenvalues of the symmetric part (K + K^T)/2 (Fig. 8)',
                 'complex': 'eigenvalues of K in the complex plane'}[what]
        fig.suptitle(f'{title}: {label}' if title else label, fontsize=9)
        fig.tight_layout()
        path = f'{prefix}{what}.png'
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_feature_norms(norms: Dict[str, Dict[str, Any]], path: str) -> str:
    """Feature norm per block (left) and per-block gain ||out|| / ||in|| (right) for several models
    (``{label: feature_norms(...)}``)."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for i, (label, r) in enumerate(norms.items()):
        idx = range(1, len(r['blocks']) + 1)
        a.plot(idx, r['rms_out'], marker='.', color=f'C{i}', label=label)
        b.plot(idx, r['gain'], marker='.', color=f'C{i}', label=label)
        nl = [k + 1 for k, kind in enumerate(r['kinds']) if kind == 'nonlocal']
        b.scatter(nl, [r['gain'][k - 1] for k in nl], s=40, facecolors='none', edgecolors=f'C{i}')
    a.set(xlabel='block', ylabel='feature RMS (output)', yscale='log', title='feature size through the network')
    b.axhline(1, color='0.6', lw=0.8)
    b.set(xlabel='block (circles: nonlocal)', ylabel='||out|| / ||in||', title='per-block gain')
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_sensitivity(results: Dict[str, Dict[str, Any]], path: str) -> str:
    """For several models (``{label: perturbation_sensitivity(...)}``): relative feature change per block at
    the largest eps (top, one panel per perturbation kind) and relative logit change and accuracy over eps."""
    plt = _pyplot()
    kinds = list(next(iter(results.values()))['perturbations'])
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 6.4), squeeze=False)
    for c, kind in enumerate(kinds):
        ax2 = axes[1][c].twinx()
        for i, (label, r) in enumerate(results.items()):
            rows = r['perturbations'][kind]
            top = rows[-1]
            axes[0][c].plot(range(1, len(top['rel_change']) + 1), top['rel_change'], marker='.', color=f'C{i}',
                            label=label)
            eps = [row['eps'] * 255 for row in rows]
            axes[1][c].plot(eps, [row['logit_rel_change'] for row in rows], marker='o', color=f'C{i}', label=label)
            ax2.plot(eps, [row['accuracy'] for row in rows], ls='--', color=f'C{i}')
        eps_max = next(iter(results.values()))['perturbations'][kind][-1]['eps'] * 255
        axes[0][c].set(xlabel='block', ylabel='||dF|| / ||F||', yscale='log',
                       title=f'{kind}: feature change per block, eps = {eps_max:g}/255')
        axes[1][c].set(xlabel='eps (x 1/255)', ylabel='||d logits|| / ||logits|| (solid)',
                       title=f'{kind}: output change and accuracy (dashed)')
        ax2.set_ylabel('accuracy % (dashed)')
        axes[0][c].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
