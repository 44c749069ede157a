"""A public simulator of 8x8 digits in the style of scikit-learn's ``load_digits``: Private
Evolution's RANDOM_API and VARIATION_API for ``examples/pe_digits.py``.

It follows the *documented* optdigits preprocessing (a 32x32 binary bitmap whose ON pixels are
counted in non-overlapping 4x4 blocks: an 8x8 image of integers 0..16) and never looks at the
private digits: the shapes are hand-written stroke skeletons (Catmull-Rom splines through control
points), one to three per digit, that a person could draw from the idea of each digit; the ranges
of rotation, shear, scale, shift and stroke width were fixed before any comparison with real
digits. A sample is a parameter vector (one tensor row); the random API draws parameters, the
variation API perturbs them with a strength in (0, 1] (parameter-space variation, as in Sim-PE,
Lin et al. 2025, arXiv 2502.05505); :meth:`DigitSimulator.render` draws them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------- templates
# coordinates: x right, y down, in the unit square. Each template = list of strokes; a stroke
# = (closed?, [control points]).
def _ellipse(cx, cy, rx, ry, n=8, start=90.0):
    a = np.deg2rad(start + np.arange(n) * 360.0 / n)
    return [(cx + rx * np.cos(t), cy - ry * np.sin(t)) for t in a]

def _arc(cx, cy, rx, ry, a0, a1, n):
    a = np.deg2rad(np.linspace(a0, a1, n))
    return [(cx + rx * np.cos(t), cy - ry * np.sin(t)) for t in a]

TEMPLATES = {
    0: [[(True, _ellipse(0.5, 0.5, 0.28, 0.42))]],
    1: [[(False, [(0.5, 0.06), (0.5, 0.5), (0.5, 0.94)])],
        [(False, [(0.32, 0.26), (0.5, 0.06), (0.5, 0.5), (0.5, 0.94)])],
        [(False, [(0.32, 0.26), (0.5, 0.06), (0.5, 0.5), (0.5, 0.94)]), (False, [(0.3, 0.94), (0.7, 0.94)])]],
    2: [[(False, _arc(0.5, 0.3, 0.26, 0.22, 160, -20, 5) + [(0.45, 0.62), (0.22, 0.92), (0.5, 0.92), (0.8, 0.92)])],
        [(False, _arc(0.5, 0.3, 0.26, 0.22, 160, -30, 5) + [(0.3, 0.8), (0.2, 0.92), (0.45, 0.85), (0.8, 0.9)])]],
    3: [[(False, _arc(0.48, 0.29, 0.24, 0.2, 150, -90, 6) + _arc(0.48, 0.71, 0.27, 0.21, 90, -150, 6)[1:])],
        [(False, [(0.22, 0.08), (0.78, 0.08), (0.45, 0.45)] + _arc(0.48, 0.7, 0.27, 0.22, 80, -150, 6))]],
    4: [[(False, [(0.62, 0.06), (0.4, 0.35), (0.18, 0.64)]), (False, [(0.18, 0.64), (0.5, 0.64), (0.84, 0.64)]),
         (False, [(0.64, 0.3), (0.64, 0.6), (0.64, 0.94)])],
        [(False, [(0.25, 0.06), (0.22, 0.35), (0.2, 0.6)]), (False, [(0.2, 0.6), (0.5, 0.6), (0.84, 0.6)]),
         (False, [(0.68, 0.1), (0.66, 0.5), (0.64, 0.94)])]],
    5: [[(False, [(0.78, 0.08), (0.5, 0.08), (0.3, 0.08), (0.28, 0.28), (0.27, 0.46)] + _arc(0.5, 0.68, 0.27, 0.24, 125, -150, 6))]],
    6: [[(False, [(0.7, 0.06), (0.45, 0.25), (0.28, 0.5)] + _arc(0.5, 0.7, 0.23, 0.22, 180, -180, 8))]],
    7: [[(False, [(0.2, 0.08), (0.5, 0.08), (0.8, 0.08), (0.6, 0.5), (0.45, 0.94)])],
        [(False, [(0.2, 0.08), (0.5, 0.08), (0.8, 0.08), (0.6, 0.5), (0.45, 0.94)]), (False, [(0.38, 0.5), (0.82, 0.5)])]],
    8: [[(True, _ellipse(0.5, 0.28, 0.2, 0.2)), (True, _ellipse(0.5, 0.71, 0.25, 0.23))],
        [(False, _arc(0.5, 0.28, 0.21, 0.21, -90, 270, 9) + _arc(0.5, 0.71, 0.25, 0.23, 90, -270, 9)[1:])]],
    9: [[(True, _ellipse(0.48, 0.32, 0.24, 0.24)), (False, [(0.72, 0.3), (0.68, 0.6), (0.62, 0.94)])],
        [(False, _arc(0.48, 0.32, 0.24, 0.24, 0, 360, 9) + [(0.66, 0.62), (0.55, 0.94)])]],
}
MAX_CP = max(sum(len(p) for _, p in t) for ts in TEMPLATES.values() for t in ts)

# global parameter ranges used by RANDOM_API; VARIATION_API perturbs within them
RANGES = {
    "rot": (-15.0, 15.0),     # degrees
    "shear": (-0.35, 0.35),   # x += shear * (y - .5)
    "sx": (0.5, 1.05),
    "sy": (0.7, 1.05),
    "tx": (-0.1, 0.1),
    "ty": (-0.08, 0.08),
    "width": (0.07, 0.17),    # stroke width, fraction of the box
}
def _catmull_rom(P: np.ndarray, closed: bool, per_seg: int = 12) -> np.ndarray:  # noqa: N803
    """Batched Catmull-Rom spline. P: (n, K, 2) control points -> (n, M, 2) curve points."""
    if closed:
        P = np.concatenate([P[:, -1:], P, P[:, :2]], 1)
    else:
        P = np.concatenate([2 * P[:, :1] - P[:, 1:2], P, 2 * P[:, -1:] - P[:, -2:-1]], 1)
    t = np.linspace(0, 1, per_seg, endpoint=False)[None, None, :, None]      # (1,1,T,1)
    p0, p1, p2, p3 = (P[:, i:P.shape[1] - 3 + i, None, :] for i in range(4))  # (n,S,1,2)
    c = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
               + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3)                      # (n,S,T,2)
    c = c.reshape(P.shape[0], -1, 2)
    return np.concatenate([c, P[:, -2:-1]], 1)


GLOBALS = list(RANGES)
CP_STD = 0.05  # random control-point jitter (unit square)
# Row layout of a sample: label, template, control-point offsets (MAX_CP x 2), the globals.
_CP = slice(2, 2 + 2 * MAX_CP)
_G = {k: 2 + 2 * MAX_CP + i for i, k in enumerate(GLOBALS)}
WIDTH = 2 + 2 * MAX_CP + len(GLOBALS)


class DigitSimulator:
    """RANDOM_API (:meth:`random`), VARIATION_API (:meth:`vary`) and the renderer (:meth:`render`)
    over parameter rows; ``seed`` fixes its own random source (public).

    Example:
        >>> sim = DigitSimulator(seed=0)
        >>> images = sim.render(sim.vary(sim.random(3, 5), 0.5))
        >>> tuple(images.shape), float(images.min()) >= 0, float(images.max()) <= 16
        ((5, 64), True, True)
    """

    def __init__(self, seed: int = 0, res: int = 32, block: int = 4) -> None:
        self.res, self.block = res, block
        self.rng = np.random.default_rng(seed)

    def random(self, label: Any, n: int) -> torch.Tensor:
        r, label = self.rng, int(label)
        rows = np.zeros((n, WIDTH))
        rows[:, 0] = label
        rows[:, 1] = r.integers(0, len(TEMPLATES[label]), n)
        rows[:, _CP] = r.normal(0, CP_STD, (n, 2 * MAX_CP))
        for k, (lo, hi) in RANGES.items():
            rows[:, _G[k]] = r.uniform(lo, hi, n)
        return torch.tensor(rows)

    def vary(self, samples: torch.Tensor, strength: float) -> torch.Tensor:
        """Each parameter moved by ``strength`` times its half range (a standard deviation),
        the control points by ``strength * CP_STD``; the template switched with probability
        ``strength / 2``."""
        r = self.rng
        rows = samples.numpy().copy()
        n = len(rows)
        rows[:, _CP] = np.clip(rows[:, _CP] + r.normal(0, CP_STD * strength, (n, 2 * MAX_CP)), -3 * CP_STD, 3 * CP_STD)
        for k, (lo, hi) in RANGES.items():
            rows[:, _G[k]] = np.clip(rows[:, _G[k]] + r.normal(0, strength * (hi - lo) / 2, n), lo, hi)
        for i in np.flatnonzero(r.random(n) < strength / 2):
            rows[i, 1] = r.integers(0, len(TEMPLATES[int(rows[i, 0])]))
        return torch.tensor(rows)

    def _curves(self, rows: np.ndarray, label: int, template: int) -> np.ndarray:
        pts_all, j = [], 0
        cp = rows[:, _CP].reshape(len(rows), MAX_CP, 2)
        for closed, pts in TEMPLATES[label][template]:
            pts_all.append(_catmull_rom(np.asarray(pts)[None] + cp[:, j:j + len(pts)], closed))
            j += len(pts)
        c = np.concatenate(pts_all, 1) - 0.5
        x, y = c[..., 0], c[..., 1]
        g = {k: rows[:, _G[k]][:, None] for k in GLOBALS}
        x = (x + g["shear"] * y) * g["sx"]
        y = y * g["sy"]
        th = np.deg2rad(g["rot"])
        x, y = np.cos(th) * x - np.sin(th) * y, np.sin(th) * x + np.cos(th) * y
        return np.stack([x + 0.5 + g["tx"], y + 0.5 + g["ty"]], -1)

    def render(self, samples: torch.Tensor) -> torch.Tensor:
        """8x8 images (rows of 64 values in 0..16, float32): a disc of the stroke width stamped at
        every point of the curves on a 32x32 grid, then 4x4 blocks counted."""
        rows = samples.numpy()
        n, res = len(rows), self.res
        images = np.zeros((n, res * res), dtype=bool)
        rmax = int(np.ceil(RANGES["width"][1] * res / 2))
        o = np.arange(-rmax, rmax + 1)
        off = np.stack(np.meshgrid(o, o, indexing="xy"), -1).reshape(-1, 2)
        keys = rows[:, 0].astype(int) * 100 + rows[:, 1].astype(int)
        for key in np.unique(keys):
            idx = np.flatnonzero(keys == key)
            c = self._curves(rows[idx], int(key // 100), int(key % 100)) * res
            pix = np.floor(c).astype(int)[:, :, None, :] + off[None, None]
            d2 = ((pix + 0.5 - c[:, :, None, :]) ** 2).sum(-1)
            radius = (rows[idx, _G["width"]] * res / 2)[:, None, None]
            ok = (d2 <= radius**2) & (pix >= 0).all(-1) & (pix < res).all(-1)
            flat = pix[..., 1] * res + pix[..., 0] + (idx * res * res)[:, None, None]
            images.reshape(-1)[flat[ok]] = True
        b = self.block
        blocks = images.reshape(n, res // b, b, res // b, b).sum((2, 4)).reshape(n, -1)
        return torch.tensor(blocks, dtype=torch.float32)
