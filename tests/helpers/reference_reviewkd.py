"""Independent references for ReviewKD (``tests/methods/test_reviewkd.py``), written from the authors'
code (dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py``: ``ABF``, ``ReviewKD.forward``,
``hcl``) and not from kdscale's: the hierarchical context loss in plain Python over nested
lists (PyTorch's adaptive-pooling bins spelled out), and the ABF chain with other tensor
operations than kdscale's (convolutions as sums of shifted einsums, batch statistics by hand,
nearest resizes as index gathers, the sigmoid as ``1 / (1 + e^-z)``)."""

from __future__ import annotations

import math

import torch


# -- the hierarchical context loss, plain Python ----------------------------------------
def _flat(batch):
    """A B x C x H x W nested list, element by element."""
    return [x for sample in batch for channel in sample for row in channel for x in row]


def mse(a, b):
    """Mean of ``(a - b)^2`` over every element (``F.mse_loss``'s default)."""
    a, b = _flat(a), _flat(b)
    assert len(a) == len(b)
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def adaptive_average(grid, size):
    """One H x W channel averaged into ``size`` x ``size`` bins: bin i covers rows
    ``floor(i H / size) .. ceil((i + 1) H / size) - 1`` (PyTorch's adaptive pooling)."""
    h, w = len(grid), len(grid[0])
    out = []
    for i in range(size):
        r0, r1 = (i * h) // size, math.ceil((i + 1) * h / size)
        row = []
        for j in range(size):
            c0, c1 = (j * w) // size, math.ceil((j + 1) * w / size)
            cells = [grid[r][c] for r in range(r0, r1) for c in range(c0, c1)]
            row.append(sum(cells) / len(cells))
        out.append(row)
    return out


def hcl_pair(s, t):
    """``hcl`` of the authors for one pair of B x C x H x W nested lists: the full-size MSE at
    weight 1, then each pyramid level 4, 2, 1 that is smaller than H at half the previous
    weight, divided by the total weight."""
    height = len(s[0][0])
    weighted, weight = [(1.0, mse(s, t))], 1.0
    for level in (4, 2, 1):
        if level >= height:
            continue
        weight = weight / 2
        pooled_s = [[adaptive_average(channel, level) for channel in sample] for sample in s]
        pooled_t = [[adaptive_average(channel, level) for channel in sample] for sample in t]
        weighted.append((weight, mse(pooled_s, pooled_t)))
    return sum(w * value for w, value in weighted) / sum(w for w, _ in weighted)


def hcl(student_maps, teacher_maps):
    return sum(hcl_pair(s, t) for s, t in zip(student_maps, teacher_maps))


def warmup(epoch, length):
    """``min(1, epoch / length)`` of the authors' ``train.py`` (0-based epochs)."""
    return 1.0 if length == 0 else min(1.0, epoch / length)


# -- the ABF chain, other tensor operations -----------------------------------------------
def conv(x, weight, bias=None):
    """Stride-1 convolution with ``padding = k // 2`` as a sum of shifted channel mixes (in
    ``x``'s dtype)."""
    k = weight.shape[-1]
    pad = k // 2
    h, w = x.shape[-2:]
    padded = torch.zeros(x.shape[0], x.shape[1], h + 2 * pad, w + 2 * pad, dtype=x.dtype)
    padded[:, :, pad:pad + h, pad:pad + w] = x
    weight = weight.detach().to(x.dtype)
    out = sum(torch.einsum("oc,bchw->bohw", weight[:, :, dy, dx], padded[:, :, dy:dy + h, dx:dx + w])
              for dy in range(k) for dx in range(k))
    return out if bias is None else out + bias.detach().to(x.dtype).view(1, -1, 1, 1)


def batch_norm(x, bn):
    """Training-mode BatchNorm: the batch's mean and biased variance per channel."""
    if not isinstance(bn, torch.nn.BatchNorm2d):  # an identity (``abf_bn: false``)
        return x
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.sum(dim=(0, 2, 3)) / n
    var = ((x - mean.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / n
    gamma, beta = bn.weight.detach().to(x.dtype).view(1, -1, 1, 1), bn.bias.detach().to(x.dtype).view(1, -1, 1, 1)
    return (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps) * gamma + beta


def nearest(x, size):
    """Nearest resize: output row i takes input row ``floor(i * H_in / H_out)``."""
    rows = [math.floor(i * x.shape[2] / size[0]) for i in range(size[0])]
    cols = [math.floor(j * x.shape[3] / size[1]) for j in range(size[1])]
    return x[:, :, rows][:, :, :, cols]


def abf(module, x, residual, out_size):
    """The authors' ``ABF.forward`` with ``module``'s parameters: (output, residual)."""
    x = batch_norm(conv(x, module.conv1[0].weight), module.conv1[1])
    if module.att_conv is not None:
        residual = nearest(residual, tuple(x.shape[-2:]))
        z = conv(torch.cat([x, residual], dim=1), module.att_conv[0].weight, module.att_conv[0].bias)
        z = 1.0 / (1.0 + torch.exp(-z))
        x = x * z[:, 0].unsqueeze(1) + residual * z[:, 1].unsqueeze(1)
    if tuple(x.shape[-2:]) != tuple(out_size):
        x = nearest(x, out_size)
    return batch_norm(conv(x, module.conv2[0].weight), module.conv2[1]), x


def review(abfs, student_maps, teacher_sizes):
    """The authors' ``ReviewKD.forward``: the deepest level alone, then each shallower level
    fused with the residual of the one below; outputs shallow to deep."""
    levels = list(range(len(student_maps)))[::-1]
    out, residual = abf(abfs[levels[0]], student_maps[levels[0]], None, teacher_sizes[levels[0]])
    results = [out]
    for i in levels[1:]:
        out, residual = abf(abfs[i], student_maps[i], residual, teacher_sizes[i])
        results.insert(0, out)
    return results
