"""DS-GIM (Sim-MPNet's double-similarity global internal enhancement) as a residual block on an
image embedding of any size; optional in front of the similarity prior's query."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class DSGIM(nn.Module):
    """Sim-MPNet's DS-GIM as a residual block y = x + ConvBlock(FC(A_hat V)) on (B, C, h, w).

    Windows of `window` x `window` cells (padded to a multiple; padded cells never count):
    S_w = mean cosine over the pairs i < j in window w; the top ceil(n/2) windows are selected;
    M = 1 outside selected windows, M_bar = 1 - M. Q = Wq(x M), K = Wk(x M_bar), V = Wv(x);
    A = Q K^T / sqrt(C) over all h*w cells; mu_i = mean_j A_ij; D_ij = |mu_i - mu_j|;
    tau_i = the (lower) median of D_i; far = D >= tau, near = D < tau (each plus the diagonal);
    A_hat = softmax(A | far) + softmax(A | near). The last BatchNorm's weight starts at 0, so the
    block is the identity at init. Cost: O((h w)^2) time and memory per image (about ten (hw, hw)
    tensors: ~0.5 GB per 64 x 64 image in float32, more with autograd).
    """

    def __init__(self, channels: int, window: int = 4) -> None:
        super().__init__()
        c, hidden = channels, max(1, channels // 4)
        self.window = window
        self.wq, self.wk, self.wv = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.fc = nn.Linear(c, c)
        self.block = nn.Sequential(
            nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
        )  # fmt: skip
        nn.init.zeros_(self.block[-1].weight)

    def window_mask(self, x: torch.Tensor) -> torch.Tensor:
        """M (B, 1, h, w): 0 inside the selected (most self-similar) windows, 1 outside."""
        b, c, h, w = x.shape
        s = self.window
        ph, pw = -h % s, -w % s
        nh, nw = (h + ph) // s, (w + pw) // s

        def windows(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, n, s*s, C)
            t = F.pad(t, (0, pw, 0, ph)).reshape(t.shape[0], t.shape[1], nh, s, nw, s)
            return t.permute(0, 2, 4, 3, 5, 1).reshape(t.shape[0], nh * nw, s * s, t.shape[1])

        xn = windows(F.normalize(x.float(), dim=1))
        real = windows(torch.ones(1, 1, h, w, device=x.device))[..., 0] > 0  # (1, n, s*s)
        upper = torch.ones(s * s, s * s, dtype=torch.bool, device=x.device).triu(1)
        pairs = real[..., :, None] & real[..., None, :] & upper  # (1, n, s*s, s*s)
        sim = ((xn @ xn.transpose(-1, -2)) * pairs).sum((-1, -2))
        score = (sim / pairs.sum((-1, -2)).clamp(min=1)).masked_fill(pairs.sum((-1, -2)) == 0, -1e4)
        chosen = torch.zeros_like(score).scatter_(1, score.topk(math.ceil(nh * nw / 2), 1)[1], 1)
        keep = 1 - chosen.reshape(b, 1, nh, 1, nw, 1).expand(b, 1, nh, s, nw, s)
        return keep.reshape(b, 1, nh * s, nw * s)[..., :h, :w].to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        b, c, h, w = x.shape
        m = self.window_mask(x)
        q = self.wq(x * m).flatten(2).transpose(1, 2)  # (B, N, C)
        k = self.wk(x * (1 - m)).flatten(2).transpose(1, 2)
        v = self.wv(x).flatten(2).transpose(1, 2)
        a = q @ k.transpose(1, 2) / math.sqrt(c)  # (B, N, N)
        mu = a.mean(-1)
        dist = (mu[:, :, None] - mu[:, None, :]).abs().float()
        # the lower median: the last of the (N + 1) // 2 smallest (kthvalue's value; topk and a
        # float eye also export to ONNX and run in onnxruntime, kthvalue and a bool eye do not)
        tau = dist.topk((dist.shape[-1] + 1) // 2, dim=-1, largest=False).values[..., -1:]
        eye = torch.eye(a.shape[-1], device=x.device) > 0
        far, near = (dist >= tau) | eye, (dist < tau) | eye
        a_hat = sum(torch.softmax(a.masked_fill(~part, float("-inf")), -1) for part in (far, near))
        out = self.fc(a_hat @ v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.block(out)
