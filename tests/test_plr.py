"""robustfl.reporting.plr: the Section 4.3 projection, on synthetic data with known answers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from robustfl.reporting.plr import pca_2d, plane_basis, project, project_plrs, select_classes

O = 16


@pytest.fixture
def templates() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(3, O))


def on_plane(templates: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    """Random affine combinations t1 + a (t2 - t1) + b (t3 - t1): points on the templates' plane."""
    ab = np.random.default_rng(seed).normal(size=(n, 2))
    return templates[0] + ab @ (templates[1:] - templates[0])


def test_basis_is_orthonormal_and_spans_the_plane(templates: np.ndarray) -> None:
    b = plane_basis(templates)
    assert b.shape == (O, 2)
    np.testing.assert_allclose(b.T @ b, np.eye(2), atol=1e-12)
    d = templates[1] - templates[0]
    np.testing.assert_allclose(b[:, 0], d / np.linalg.norm(d), atol=1e-12)  # Gram-Schmidt's first vector
    for v in templates[1:] - templates[0]:  # both directions lie in the span
        np.testing.assert_allclose(b @ (b.T @ v), v, atol=1e-12)
    lin = plane_basis(templates, affine=False)
    assert lin.shape == (O, 3)
    np.testing.assert_allclose(lin.T @ lin, np.eye(3), atol=1e-12)


def test_points_on_the_plane_keep_their_distances(templates: np.ndarray) -> None:
    pts = on_plane(templates, 30)
    coords = project(pts, plane_basis(templates), templates[0])
    np.testing.assert_allclose(pdist(coords), pdist(pts), rtol=1e-10)
    two_d, tpl = project_plrs(pts, templates)  # PCA of 2-D coordinates is a rotation: still isometric
    assert two_d.shape == (30, 2) and tpl.shape == (3, 2)
    np.testing.assert_allclose(pdist(two_d), pdist(pts), rtol=1e-10)
    np.testing.assert_allclose(pdist(tpl), pdist(templates), rtol=1e-10)
    # distances between points and templates are preserved in the same frame
    np.testing.assert_allclose(np.linalg.norm(two_d[0] - tpl[1]), np.linalg.norm(pts[0] - templates[1]),
                               rtol=1e-10)


def test_orthogonal_offsets_are_projected_away(templates: np.ndarray) -> None:
    pts = on_plane(templates, 10)
    b = plane_basis(templates)
    noise = np.random.default_rng(2).normal(size=pts.shape)
    noise -= (noise @ b) @ b.T  # the component orthogonal to the plane
    np.testing.assert_allclose(project(pts + noise, b, templates[0]), project(pts, b, templates[0]), atol=1e-10)
    # a known coordinate: t1 + 2 (t2 - t1) sits at (2 |t2 - t1|, 0)
    p = templates[0] + 2 * (templates[1] - templates[0])
    np.testing.assert_allclose(project(p, b, templates[0]),
                               [2 * np.linalg.norm(templates[1] - templates[0]), 0.0], atol=1e-10)


def test_linear_span_mode_and_pca_reduction(templates: np.ndarray) -> None:
    w = np.random.default_rng(3).normal(size=(40, 3))
    pts = w @ templates  # in the linear span of the three templates
    b = plane_basis(templates, affine=False)
    np.testing.assert_allclose(pdist(project(pts, b)), pdist(pts), rtol=1e-10)
    flat = np.c_[np.linspace(-5, 5, 40), np.linspace(-5, 5, 40) * 0.5, np.zeros(40)]
    out, pca = pca_2d(flat)
    assert out.shape == (40, 2)
    assert pca.explained_variance_ratio_[0] == pytest.approx(1.0)


def test_degenerate_inputs_raise(templates: np.ndarray) -> None:
    collinear = np.stack([templates[0], 2 * templates[0], 3 * templates[0]])
    with pytest.raises(ValueError, match="degenerate"):
        plane_basis(collinear)
    with pytest.raises(ValueError, match=r"\(3, o\)"):
        plane_basis(templates[:2])
    with pytest.raises(ValueError, match="dimension"):
        project(np.zeros((2, O + 1)), plane_basis(templates))


def test_select_classes_is_seeded_and_distinct() -> None:
    y = np.repeat(np.arange(10), 5)
    a, b = select_classes(y, seed=7), select_classes(y, seed=7)
    assert a == b and len(set(a)) == 3 and set(a) <= set(range(10)) and list(a) == sorted(a)
    assert len({select_classes(y, seed=s) for s in range(10)}) > 1
    with pytest.raises(ValueError, match="only 2"):
        select_classes([0, 1, 1, 0])
