"""Literal implementations of the paper's equations, written loop by loop, for the tests to compare with."""
import math

import torch

GAMMA = 0.5772156649


def constant(operator, s, n=2):
    """c_{n,s}, c_{n,-s}, c_n written out from Section 3 of the paper."""
    if operator == 'diffusion':
        return 1.0
    if operator == 'frac_laplacian':
        return 4 ** s * math.gamma(n / 2 + s) / (math.pi ** (n / 2) * abs(math.gamma(-s)))
    if operator == 'inv_frac_laplacian':
        return math.gamma(n / 2 - s) / (4 ** s * math.pi ** (n / 2) * math.gamma(s))
    return 1.0 / ((4 * math.pi) ** (n / 2) * math.gamma(n / 2))


def aggregate(theta, phi, vq, vk, operator, s=None, n=2, lam=1.0, kernel='dot', normalizer='key'):
    """Double loop over query i and key j of the bracket in (4.1), (4.4)-(4.6)."""
    if s is None:
        s = {'diffusion': None, 'frac_laplacian': 0.5, 'inv_frac_laplacian': 0.5, 'log': n / 2}[operator]
    c = constant(operator, s, n)
    b_size, _, n_q = theta.shape
    m = phi.shape[2]
    out = torch.zeros(b_size, vq.shape[1], n_q, dtype=torch.float64)
    for b in range(b_size):
        for i in range(n_q):
            acc = torch.zeros(vq.shape[1], dtype=torch.float64)
            rowsum = 0.0
            for j in range(m):
                ti, pj = theta[b, :, i].double(), phi[b, :, j].double()
                vi, vj = vq[b, :, i].double(), vk[b, :, j].double()
                if operator == 'diffusion':
                    dot = float((ti * pj).sum())
                    w = lam * dot if kernel == 'dot' else math.exp(lam * dot)
                    term = w * (vj - vi)
                else:
                    d = math.sqrt(float(((ti - pj) ** 2).sum()))
                    if d == 0:
                        w, term = 0.0, 0.0 * vj
                    elif operator == 'frac_laplacian':
                        w = c * lam / d ** (n + 2 * s)
                        term = w * (vi - vj)
                    elif operator == 'inv_frac_laplacian':
                        w = c * lam / d ** (n - 2 * s)
                        term = w * vj
                    else:
                        w = c * lam * (-2 * math.log(d) - GAMMA)
                        term = w * vj
                acc = acc + term
                rowsum += w
            norm = {'key': m, 'query': n_q, 'rowsum': rowsum}.get(normalizer, normalizer)
            out[b, :, i] = acc / norm
    return out


def max_pool(x, p):
    """Max over non-overlapping p x p windows, dropping incomplete windows."""
    b, c, h, w = x.shape
    out = torch.empty(b, c, h // p, w // p, dtype=x.dtype)
    for r in range(h // p):
        for q in range(w // p):
            out[:, :, r, q] = x[:, :, r * p:(r + 1) * p, q * p:(q + 1) * p].amax(dim=(2, 3))
    return out


def conv1x1(x, conv):
    w = conv.weight.detach().double()[:, :, 0, 0]
    out = torch.einsum('oc,bchw->bohw', w, x)
    return out if conv.bias is None else out + conv.bias.detach().double().view(1, -1, 1, 1)


def batch_norm_eval(x, bn):
    mean, var = bn.running_mean.double(), bn.running_var.double()
    w, b = bn.weight.detach().double(), bn.bias.detach().double()
    return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps) * w.view(1, -1, 1, 1) \
        + b.view(1, -1, 1, 1)


def pide_block(block, x):
    """B_k = X + h ReLU(BN(K_k A(P B_{k-1}))), the output X + gamma (B_S - X), the kernel from theta(X), phi(X)
    pooled (eval-mode BN), evaluated at theta / sigma, phi / sigma for the block's ``embed_scale`` sigma (1: the
    paper's kernel); P the value projection and gamma the update scale where the block has them (the paper's:
    neither)."""
    x = x.double()
    b, c, hh, ww = x.shape
    theta = conv1x1(x, block.theta)
    phi = theta if block.phi is None else conv1x1(x, block.phi)
    p = block.subsample
    phi_k = max_pool(phi, p) if p > 1 else phi
    out = x
    for conv, bn in zip(block.convs, block.norms):
        v = out if block.value_proj is None else conv1x1(out, block.value_proj)
        vk = max_pool(v, p) if p > 1 else v
        sigma = block.embed_scale
        agg = aggregate(theta.flatten(2) / sigma, phi_k.flatten(2) / sigma, v.flatten(2), vk.flatten(2),
                        block.operator, block.s, block.n, block.lam, block.kernel, block.normalizer)
        update = torch.relu(batch_norm_eval(conv1x1(agg.view(b, v.shape[1], hh, ww), conv), bn))
        out = x + block.h * update
    if block.gamma is not None:
        out = x + block.gamma.detach().double().view(1, -1, 1, 1) * (out - x)
    return out
