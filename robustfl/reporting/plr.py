"""PLR visualisation of Section 4.3 (after Müller et al. 2019), used by Figures 1a, 4, 6, 10, 11.

Procedure: 1) pick three classes; 2) orthonormal basis of the plane on which their templates
(omega_k, rows of the last layer's weights, Section 4.2) lie; 3) project the PLRs onto that plane
(inner products with the basis); 4) PCA to 2-D.

Three templates span an *affine* plane (two directions ``t2 - t1``, ``t3 - t1``), which is what
:func:`plane_basis` returns by default; then step 4 is a rotation (plus centring) of the plane. The
paper's word "hyperplane" can also be read as the *linear* span of the three templates (three
directions), in which case PCA genuinely reduces 3-D to 2-D: pass ``affine=False``.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from sklearn.decomposition import PCA


def select_classes(labels: ArrayLike, k: int = 3, seed: int = 0) -> tuple[int, ...]:
    """Step 1: ``k`` distinct classes drawn at random (seeded) from those present in ``labels``."""
    present = np.unique(np.asarray(labels))
    if len(present) < k:
        raise ValueError(f"need {k} classes, the labels hold only {len(present)}: {present.tolist()}")
    rng = np.random.default_rng(seed)
    return tuple(sorted(int(c) for c in rng.choice(present, size=k, replace=False)))


def plane_basis(templates: ArrayLike, affine: bool = True, tol: float = 1e-10) -> NDArray[np.float64]:
    """Step 2: orthonormal basis ``(o, k)`` of the plane through the three templates ``(3, o)``.

    ``affine=True``: QR of ``(t2 - t1, t3 - t1)``, k = 2. ``affine=False``: QR of ``(t1, t2, t3)``, k = 3.
    Raises ``ValueError`` when the templates are (numerically) collinear / dependent.
    """
    t = np.asarray(templates, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] != 3:
        raise ValueError(f"templates must have shape (3, o), got {t.shape}")
    vecs = (t[1:] - t[0]) if affine else t
    q, r = np.linalg.qr(vecs.T)  # (o, k), Gram-Schmidt up to signs
    diag = np.abs(np.diag(r))
    if diag.min() <= tol * max(1.0, np.abs(vecs).max()):
        raise ValueError("templates are degenerate: they do not span a plane")
    return q * np.sign(np.diag(r))  # fix signs so basis[:, 0] points along t2 - t1 (or t1)


def project(points: ArrayLike, basis: ArrayLike, origin: ArrayLike | None = None) -> NDArray[np.float64]:
    """Step 3: coordinates ``(..., k)`` of ``points`` ``(..., o)`` in the plane: ``(p - origin) @ basis``."""
    p = np.asarray(points, dtype=np.float64)
    b = np.asarray(basis, dtype=np.float64)
    if p.shape[-1] != b.shape[0]:
        raise ValueError(f"points have dimension {p.shape[-1]}, the basis {b.shape[0]}")
    if origin is not None:
        p = p - np.asarray(origin, dtype=np.float64)
    return p @ b


def pca_2d(coords: ArrayLike, fit_on: ArrayLike | None = None) -> tuple[NDArray[np.float64], PCA]:
    """Step 4: PCA of ``coords`` ``(N, k)`` to 2-D (fitted on ``fit_on`` if given, else on ``coords``)."""
    x = np.asarray(coords, dtype=np.float64)
    pca = PCA(n_components=2).fit(x if fit_on is None else np.asarray(fit_on, dtype=np.float64))
    return pca.transform(x), pca


def project_plrs(plrs: ArrayLike, templates: ArrayLike, affine: bool = True,
                 fit_on: ArrayLike | None = None) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Section 4.3 end to end: PLRs ``(N, o)`` and the three templates ``(3, o)`` -> 2-D points
    ``(N, 2)`` and the templates' own 2-D positions ``(3, 2)``, in the same PCA frame.

    ``fit_on`` (PLRs, ``(M, o)``) chooses what the PCA is fitted on (default: ``plrs``).
    """
    t = np.asarray(templates, dtype=np.float64)
    basis = plane_basis(t, affine=affine)
    origin = t[0] if affine else None
    coords = project(plrs, basis, origin)
    fit = coords if fit_on is None else project(fit_on, basis, origin)
    pts, pca = pca_2d(coords, fit_on=fit)
    return pts, pca.transform(project(t, basis, origin))


__all__ = ["pca_2d", "plane_basis", "project", "project_plrs", "select_classes"]
