"""Spans <-> masks, growth, labelling and ragged helpers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from scarletstore.detect import footprint as fp


@settings(max_examples=60, deadline=None)
@given(mask=hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=17)),
       y0=st.integers(-50, 50), x0=st.integers(-50, 50))
def test_spans_round_trip_exact(mask, y0, x0):
    sy, sx0, sx1 = fp.mask_to_spans(mask, y0, x0)
    assert sy.dtype == sx0.dtype == sx1.dtype == np.int32
    # sorted by y then x, runs maximal and disjoint
    key = sy.astype(np.int64) * 10_000 + sx0
    assert np.all(np.diff(key) > 0)
    same_row = sy[1:] == sy[:-1]
    assert np.all(sx0[1:][same_row] > sx1[:-1][same_row] + 1)
    back = fp.spans_to_mask(sy, sx0, sx1, (y0, x0, mask.shape[0], mask.shape[1]))
    np.testing.assert_array_equal(back, mask)
    assert fp.spans_area(sy, sx0, sx1) == int(mask.sum())
    if mask.any():
        ys, xs = np.nonzero(mask)
        assert fp.spans_bbox(sy, sx0, sx1) == (
            ys.min() + y0, xs.min() + x0, ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    else:
        assert sy.size == 0 and fp.spans_bbox(sy, sx0, sx1) == (0, 0, 0, 0)


def test_spans_to_mask_clips_to_bbox():
    sy, sx0, sx1 = np.array([0, 1, 5]), np.array([-3, 2, 0]), np.array([1, 9, 0])
    m = fp.spans_to_mask(sy, sx0, sx1, (0, 0, 3, 4))
    expect = np.zeros((3, 4), bool)
    expect[0, 0:2] = True
    expect[1, 2:4] = True
    np.testing.assert_array_equal(m, expect)


@pytest.mark.parametrize("radius", [0.5, 1.0, 1.5, 2.3, 4.0])
def test_grow_mask_equals_disk_dilation(radius):
    rng = np.random.default_rng(3)
    mask = rng.random((40, 37)) > 0.97
    mask[0, 5] = mask[39, 36] = True  # edges
    r = int(np.floor(radius))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = dy ** 2 + dx ** 2 <= radius ** 2
    expect = ndimage.binary_dilation(mask, structure=disk)
    np.testing.assert_array_equal(fp.grow_mask(mask, radius), expect)


def test_grow_mask_zero_radius_and_empty():
    m = np.zeros((5, 6), bool)
    assert not fp.grow_mask(m, 3).any()
    m[2, 3] = True
    np.testing.assert_array_equal(fp.grow_mask(m, 0), m)


def test_labels_to_spans_groups_by_label():
    rng = np.random.default_rng(5)
    mask = ndimage.binary_dilation(rng.random((60, 50)) > 0.985, iterations=2)
    labels, n = fp.label_mask(mask)
    ref, nref = ndimage.label(mask, structure=np.ones((3, 3)))
    assert n == nref
    np.testing.assert_array_equal(labels, ref)
    counts, sy, sx0, sx1 = fp.labels_to_spans(labels, n)
    assert counts.size == n and counts.sum() == sy.size
    off = fp.counts_to_offsets(counts)
    assert off[0] == 0 and off[-1] == sy.size
    for i in range(n):
        s = slice(off[i], off[i + 1])
        assert s == fp.ragged_slice(counts, i)
        bbox = fp.spans_bbox(sy[s], sx0[s], sx1[s])
        sub = fp.spans_to_mask(sy[s], sx0[s], sx1[s], bbox)
        y0, x0, h, w = bbox
        np.testing.assert_array_equal(sub, labels[y0:y0 + h, x0:x0 + w] == i + 1)
        key = sy[s].astype(np.int64) * 1000 + sx0[s]
        assert np.all(np.diff(key) > 0)


def test_label_mask_connectivity():
    m = np.zeros((3, 3), bool)
    m[0, 0] = m[1, 1] = True
    assert fp.label_mask(m, 8)[1] == 1
    assert fp.label_mask(m, 4)[1] == 2


def test_counts_to_offsets():
    np.testing.assert_array_equal(fp.counts_to_offsets([2, 0, 3]), [0, 2, 2, 5])
    assert fp.counts_to_offsets([]).tolist() == [0]
