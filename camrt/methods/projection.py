"""The first-principal-component projection shared by Eigen-CAM and Eigen-Grad-CAM (not a plugin).

pytorch-grad-cam's ``utils/svd_on_activations.py`` ``get_2d_projection``, which camrt follows
exactly: per sample, the [K, h, w] maps become an (h*w) x K matrix O whose columns are centred
(the Eigen-CAM paper does not centre; pytorch-grad-cam notes that without centring the map comes
out negative), O = U S V^T (numpy's ``linalg.svd``, float32), and the map is O v_1 reshaped to
[h, w]. Sign convention: the sign of v_1 is whatever LAPACK returns -- no correction is applied
(unlike Seg-Eigen-CAM's flip when |min| > |max|), so the map can come out negated, exactly as in
pytorch-grad-cam 1.5.7. NaNs are replaced by 0 first, as there. One departure: the reduced SVD
(``full_matrices=False``; pytorch-grad-cam asks for the full one). v_1 is the same, sign included
(same LAPACK gesdd; 200/200 random 49 x 1280 matrices agreed, and the parity tests check it against
pytorch-grad-cam), and it is ~17x faster when K >> h*w (0.011 s against 0.19 s for 49 x 1280).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProjectionOptions:
    """eigen_smooth: accepted so that one option set serves the whole CAM family; the map is a
    first principal component already, so it changes nothing (pytorch-grad-cam ignores it too)."""

    eigen_smooth: bool = False


def first_principal_component(maps: np.ndarray) -> np.ndarray:
    """[B, K, h, w] -> [B, h, w] float32: each sample's projection on its first principal component."""
    maps = np.asarray(maps, dtype=np.float32)
    maps = np.where(np.isnan(maps), np.float32(0), maps)
    batch, channels, height, width = maps.shape
    out = np.empty((batch, height, width), dtype=np.float32)
    for i, sample in enumerate(maps):
        matrix = sample.reshape(channels, -1).transpose()
        matrix = matrix - matrix.mean(axis=0)
        _, _, vt = np.linalg.svd(matrix, full_matrices=False)
        out[i] = (matrix @ vt[0, :]).reshape(height, width)
    return out
