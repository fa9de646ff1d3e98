"""The independent scene generator makes what it states (truth, PSFs, noise)."""

import numpy as np
import pytest

from scarletstore.simulate import sersic_scenes as ss


@pytest.fixture(scope="module")
def scene():
    return ss.make_scene(5, size=160, n_groups=18)


def test_stamps_sum_to_stated_fluxes_and_to_the_noise_free_image(scene):
    total = np.zeros_like(scene.model)
    for k, sid in enumerate(scene.truth["id"]):
        (y0, x0, h, w), stamp = scene.stamps[int(sid)]
        assert stamp.shape == (len(scene.bands), h, w)
        total[:, y0:y0 + h, x0:x0 + w] += stamp
        for b, band in enumerate(scene.bands):
            assert stamp[b].sum() == pytest.approx(scene.truth[f"flux_{band}"][k], rel=1e-12)
        assert stamp.min() > -1e-9 * stamp.max()  # FFT round-off only
    np.testing.assert_allclose(total, scene.model, atol=1e-9)


def test_scene_holds_every_kind_and_many_blends(scene):
    kinds = set(scene.truth["kind"])
    assert kinds == {"sersic", "bulge_disk", "clumpy", "star"}
    # groups put sources within a few pixels: most have a neighbour within 9 px
    pos = np.c_[scene.truth["y"], scene.truth["x"]]
    d = np.hypot(*(pos[:, None] - pos[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert (d.min(axis=1) < 9).mean() > 0.5


def test_psfs_are_normalised_centred_and_differ_per_band():
    psfs = np.stack([ss.psf_image(b) for b in ss.BANDS])
    c = (ss.PSF_SIZE - 1) / 2
    y, x = np.indices(psfs.shape[1:])
    widths = []
    for p in psfs:
        assert p.sum() == pytest.approx(1.0, abs=1e-12)
        assert (p * y).sum() == pytest.approx(c, abs=1e-6) and (p * x).sum() == pytest.approx(c, abs=1e-6)
        widths.append(np.sqrt((p * ((y - c) ** 2 + (x - c) ** 2)).sum()))
        # Moffat wings: 2 % or more of the light beyond 3 core sigmas' radius of 5 px
        assert p[np.hypot(y - c, x - c) > 6].sum() > 0.02
    assert len(set(np.round(widths, 2))) == len(ss.BANDS)


@pytest.mark.parametrize("n", [0.5, 1.0, 2.5, 4.0])
def test_sersic_profile_has_its_half_light_radius(n):
    from scipy.special import gammainc

    re = 4.0
    img = ss.sersic_image((81, 81), 40.3, 39.8, re, n, 1.0, 0.0)
    assert img.sum() == pytest.approx(1.0)
    y, x = np.indices(img.shape)
    r = np.hypot(y - 40.3, x - 39.8)
    # half the untruncated light lies within r_e; the stamp keeps L(< TRUNCATE r_e) of it
    kept = gammainc(2 * n, ss.sersic_b(n) * ss.TRUNCATE ** (1 / n))
    assert img[r < re].sum() == pytest.approx(0.5 / kept, abs=0.02)
    assert img[r > ss.TRUNCATE * re + 1].sum() == 0


def test_star_stamp_is_the_psf_moved_to_its_position():
    psf = ss.psf_image("r")[None]
    (y0, x0), st = ss.render_star([100.0], 20.3, 31.7, psf)
    y, x = np.indices(st.shape[1:])
    assert st.sum() == pytest.approx(100.0)
    assert (st[0] * (y + y0)).sum() / 100 == pytest.approx(20.3, abs=0.02)
    assert (st[0] * (x + x0)).sum() / 100 == pytest.approx(31.7, abs=0.02)


def test_noise_has_the_stated_variance_and_is_correlated(scene):
    rng = np.random.default_rng(3)
    noise = ss.correlated_noise(rng, (400, 400), 2.0)
    assert noise.std() == pytest.approx(2.0, rel=0.02)
    k = np.outer(ss.NOISE_KERNEL_1D, ss.NOISE_KERNEL_1D)
    k /= np.sqrt((k * k).sum())
    expected = (k[:, 1:] * k[:, :-1]).sum()  # correlation of horizontal neighbours
    measured = np.corrcoef(noise[:, 1:].ravel(), noise[:, :-1].ravel())[0, 1]
    assert expected > 0.1 and measured == pytest.approx(expected, abs=0.02)
    resid = scene.image - scene.model
    for b, band in enumerate(scene.bands):
        assert resid[b].std() == pytest.approx(np.sqrt(scene.variance[b].mean()), rel=0.05)


def test_same_seed_same_scene():
    a, b = ss.make_scene(9, size=80, n_groups=5), ss.make_scene(9, size=80, n_groups=5)
    np.testing.assert_array_equal(a.image, b.image)
    c = ss.make_scene(10, size=80, n_groups=5)
    assert not np.array_equal(a.image, c.image)
