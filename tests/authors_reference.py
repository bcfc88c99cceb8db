"""The authors' Keras blocks (github.com/dkannan08/Nonlocal-CNN, ``Module/``) transcribed op by op in numpy.

Float64, in their layout: NHWC activations, HWIO convolution kernels, (kernel, bias) pairs for ``Conv2D``.
Independent of pide_zoo and of ``tests/reference.py``: the convolutions, pooling and batch norm are written
here as loops, the rest follows their TensorFlow calls one by one.
"""
import math

import numpy as np

# Keras BatchNormalization() defaults: every batch norm of the authors' networks is built with them.
KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.99
# Their truncated constant in Nonlocal_pseudo (typ 4).
EULER_MASCHERONI = 0.5772156649
# Their training script's step size and kernel scale (nonlocal_test.py: --h default, lam=0.1).
H = 0.06
LAM = 0.1


def relu(x):
    return np.maximum(x, 0.0)


def same_pads(size, k, stride):
    """TensorFlow's padding='same' along one axis: (before, after); the odd pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv2d(x, kernel, bias=None, stride=1):
    """``Conv2D(padding='same', strides=stride)``: x (B, H, W, I), kernel (kh, kw, I, O), a loop over taps."""
    b, hgt, wid, _ = x.shape
    kh, kw, _, c_out = kernel.shape
    (top, bottom), (left, right) = same_pads(hgt, kh, stride), same_pads(wid, kw, stride)
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh, ow = -(-hgt // stride), -(-wid // stride)
    out = np.zeros((b, oh, ow, c_out))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :] @ kernel[i, j]
    return out if bias is None else out + bias


def conv2d_transpose(t, kernel, output_shape):
    """``tf.nn.conv2d_transpose(t, kernel, output_shape, strides=1)`` ('SAME'): the adjoint of :func:`conv2d`,
    scattering every output pixel back through the taps."""
    b, hgt, wid, c_in = output_shape
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = same_pads(hgt, kh, 1), same_pads(wid, kw, 1)
    out = np.zeros((b, hgt + top + bottom, wid + left + right, c_in))
    for i in range(kh):
        for j in range(kw):
            out[:, i:i + hgt, j:j + wid, :] += t @ kernel[i, j].T
    return out[:, top:top + hgt, left:left + wid, :]


def max_pool(x, size):
    """``MaxPool2D(pool_size=size)``: strides = pool size, 'valid' (a remainder is dropped)."""
    b, hgt, wid, c = x.shape
    oh, ow = hgt // size, wid // size
    out = np.full((b, oh, ow, c), -np.inf)
    for i in range(size):
        for j in range(size):
            out = np.maximum(out, x[:, i:i + size * oh:size, j:j + size * ow:size, :])
    return out


class BatchNorm:
    """``BatchNormalization()`` on NHWC with its variables; ``epsilon`` and ``momentum`` are Keras's defaults.

    Training normalises with the batch mean and the biased batch variance and moves the moving statistics
    towards the batch's as Keras's fused kernel does (the authors ran float32, where Keras fuses):
    moving = momentum * moving + (1 - momentum) * batch, with the Bessel-corrected variance.
    """

    def __init__(self, gamma, beta, moving_mean, moving_variance, epsilon=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM):
        self.gamma, self.beta = gamma, beta
        self.moving_mean, self.moving_variance = moving_mean.copy(), moving_variance.copy()
        self.epsilon, self.momentum = epsilon, momentum
        self.batch_mean = self.batch_variance = None

    def __call__(self, x, training):
        if training:
            count = x.size // x.shape[-1]
            mean = x.sum((0, 1, 2)) / count
            variance = ((x - mean) ** 2).sum((0, 1, 2)) / count
            self.batch_mean, self.batch_variance = mean, variance
            factor = 1.0 - self.momentum
            self.moving_mean = (1.0 - factor) * self.moving_mean + factor * mean
            self.moving_variance = (1.0 - factor) * self.moving_variance + factor * variance * count / (count - 1)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        return (x - mean) / np.sqrt(variance + self.epsilon) * self.gamma + self.beta


def hamiltonian_block(inputs, conv1, conv2, bn1, bn2, h=H, training=False):
    """``Hamiltonian_Block.call`` (ODE_Blocks.py): one Verlet step, the conv bias added again after K^T."""
    y, z = np.split(inputs, 2, axis=-1)
    half_shape = (inputs.shape[0], inputs.shape[1], inputs.shape[2], inputs.shape[3] // 2)
    t = conv2d(z, *conv1)
    t = relu(bn1(t, training))
    t = conv2d_transpose(t, conv1[0], half_shape)
    t = t + conv1[1]
    y = y + h * t
    t = conv2d(y, *conv2)
    t = relu(bn2(t, training))
    t = conv2d_transpose(t, conv2[0], half_shape)
    t = t + conv2[1]
    z = z - h * t
    return np.concatenate([y, z], -1)


def _flat(t):
    return t.reshape(t.shape[0], -1, t.shape[3])


def _stages(inputs, f_x, w_layers, bn_layers, h, subsample, nl_pool_size, training, combine):
    """The stages shared by both blocks: ``fg = combine(f_x, g, sub_g)``, 1x1 conv, BN, ReLU, added to the
    block's input (``lastval`` stays the input: the authors left ``lastval = output`` commented out)."""
    b, hgt, wid, _ = inputs.shape
    lastval = inputs
    g_x = inputs
    output = None
    for w_layer, bn in zip(w_layers, bn_layers):
        sub_g_x = _flat(max_pool(g_x, nl_pool_size)) if subsample else None
        fg = combine(f_x, _flat(g_x), sub_g_x)
        fg = fg.reshape(b, hgt, wid, -1)
        output = conv2d(fg, *w_layer)
        output = relu(bn(output, training))
        output = lastval + h * output
        g_x = output
    return output


def nonlocal_pseudo(inputs, conv_theta, conv_phi, w_layers, bn_layers, typ=2, n=2.0, s=0.5, norm='norm1',
                    lam=LAM, h=H, subsample=False, nl_pool_size=2, training=False):
    """``Nonlocal_pseudo.call`` (Nonlocal_Blocks.py): typ 2 (-Delta)^s, 3 (-Delta)^-s, 4 (-Delta)^-1;
    ``norm`` 'norm1' divides by the number of keys N, 'norm2' by the kernel's row sums. One stage per
    entry of ``w_layers`` (their ``iternum``)."""
    if typ == 2:
        power, version = n + 2 * s, 2
    elif typ == 3:
        power, version = n - 2 * s, 1
    elif typ == 4:
        power, version = None, 1
    else:
        raise NotImplementedError(typ)
    theta_x = _flat(conv2d(inputs, *conv_theta))
    phi_x = conv2d(inputs, *conv_phi)
    if subsample:
        phi_x = max_pool(phi_x, nl_pool_size)
    phi_x = _flat(phi_x)
    # Their pairwise distances: sqrt(|a|^2 - 2 a.b + |b|^2).
    row_norms_a = (theta_x ** 2).sum(-1).reshape(theta_x.shape[0], -1, 1)
    row_norms_b = (phi_x ** 2).sum(-1).reshape(phi_x.shape[0], 1, -1)
    f_x = np.sqrt(row_norms_a - 2 * theta_x @ phi_x.transpose(0, 2, 1) + row_norms_b)
    with np.errstate(divide='ignore'):
        if typ == 2:
            factor = 4 ** s * math.exp(math.lgamma(n / 2 + s)) / (math.pi ** (n / 2) * abs(math.exp(math.lgamma(-s))))
            f_x = f_x ** power
            f_x = np.where(f_x == 0, 0.0, factor / f_x)  # tf.math.divide_no_nan
        elif typ == 3:
            factor = math.exp(math.lgamma(n / 2 - s)) / (4 ** s * math.pi ** (n / 2) * math.exp(math.lgamma(s)))
            f_x = f_x ** power
            f_x = np.where(f_x == 0, 0.0, factor / f_x)
        else:
            factor = 1.0 / (4.0 * math.pi * math.exp(math.lgamma(1.0)))
            log_dist = np.log(f_x)
            log_dist = np.where(np.isinf(log_dist), -EULER_MASCHERONI / 2.0, log_dist)
            f_x = factor * (-2.0 * log_dist - EULER_MASCHERONI)
    big_n = f_x.shape[-1]
    f_x = lam * f_x
    if norm not in ('norm1', 'norm2'):
        raise NotImplementedError(norm)
    if version == 1:
        f_x = f_x / big_n if norm == 'norm1' else f_x / f_x.sum(2, keepdims=True)

        def combine(f, g, sub_g):
            return f @ (sub_g if subsample else g)
    else:
        f_sum = f_x.sum(2, keepdims=True)

        def combine(f, g, sub_g):
            fg = f @ (sub_g if subsample else g)
            tmp = g * f_sum
            return (tmp - fg) / big_n if norm == 'norm1' else (tmp - fg) / f_sum
    return _stages(inputs, f_x, w_layers, bn_layers, h, subsample, nl_pool_size, training, combine)


def nonlocal_diff(inputs, conv_theta, conv_phi, w_layers, bn_layers, affinity='dot1', lam=LAM, h=H,
                  subsample=False, nl_pool_size=2, training=False):
    """``Nonlocal_diff.call`` with version=2 (as their Units build it): affinity 'dot1' (divide by N),
    'dot2' (by the row sums) or 'embed_gaussian' (exp kernel, by the row sums)."""
    if affinity not in ('dot1', 'dot2', 'embed_gaussian'):
        raise NotImplementedError(affinity)
    theta_x = _flat(conv2d(inputs, *conv_theta))
    phi_x = conv2d(inputs, *conv_phi)
    if subsample:
        phi_x = max_pool(phi_x, nl_pool_size)
    phi_x = _flat(phi_x).transpose(0, 2, 1)
    f_x = theta_x @ phi_x
    big_n = f_x.shape[-1]
    f_x = lam * f_x
    if affinity == 'embed_gaussian':
        f_x = np.exp(f_x)
    f_sum = f_x.sum(2, keepdims=True)

    def combine(f, g, sub_g):
        fg = f @ (sub_g if subsample else g)
        tmp = g * f_sum
        return (fg - tmp) / big_n if affinity == 'dot1' else (fg - tmp) / f_sum
    return _stages(inputs, f_x, w_layers, bn_layers, h, subsample, nl_pool_size, training, combine)


def resnet_v1_block(x, conv_a, bn_a, conv_b, bn_b, shortcut, strides=1, training=False):
    """One residual block of ``resnet_v1`` (ResNet.py): resnet_layer(x, strides) (conv-BN-ReLU),
    resnet_layer(y, activation=None) (conv-BN), the 1x1 projection shortcut resnet_layer(x, kernel_size=1,
    strides, activation=None, batch_normalization=False) when ``shortcut`` is given, add, ReLU."""
    y = relu(bn_a(conv2d(x, *conv_a, stride=strides), training))
    y = bn_b(conv2d(y, *conv_b), training)
    if shortcut is not None:
        x = conv2d(x, *shortcut, stride=strides)
    return relu(x + y)
