"""Cell selection: NMS-KSD peaks against a brute-force reference, detection cells on hand-made boxes,
channel pooling, and the policy that assembles one image view's records."""

import math

import pytest
import torch

from detkd.errors import ConfigError
from detkd.knowledge import channel_group_max
from detkd.store.detections import detection_cells, select_from_detections
from detkd.store.format import StoreError
from detkd.store.peaks import peaks_from_saliency, saliency_map, select_peaks
from detkd.store.select import SelectionPolicy, default_top_k


def brute_peaks(sal, *, kernel, threshold, mode, top_k, valid_hw):
    """Python-loop reference: kept iff it beats every valid window neighbour in (value desc, index asc)."""
    h, w = sal.shape
    vh, vw = valid_hw if valid_hw is not None else (h, w)
    vh, vw = min(vh, h), min(vw, w)
    if vh == 0 or vw == 0:
        return []
    region = sal[:vh, :vw]
    lo, hi = region.min(), region.max()
    pad = kernel // 2
    kept = []
    for y in range(vh):
        for x in range(vw):
            s = sal[y, x]
            beaten = False
            for ny in range(y - pad, y + pad + 1):
                for nx in range(x - pad, x + pad + 1):
                    if (ny, nx) == (y, x) or not (0 <= ny < vh and 0 <= nx < vw):
                        continue
                    n = sal[ny, nx]
                    if n > s or (n == s and ny * w + nx < y * w + x):
                        beaten = True
            passes = bool((s - lo) >= threshold * (hi - lo)) if mode == "relative" else bool(s >= threshold)
            if not beaten and passes:
                kept.append((-float(s), y * w + x, y, x))
    kept.sort()
    if top_k is not None:
        kept = kept[:top_k]
    return [(y, x) for _, _, y, x in kept]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_peaks_match_brute_force(seed, kernel):
    g = torch.Generator().manual_seed(seed)
    h, w = 7 + seed, 9 - seed // 2
    # Few distinct values: many ties and plateaus exercise the tie rule.
    sal = torch.randint(0, 4 if seed % 2 else 50, (h, w), generator=g).float() - 1.5
    for valid_hw in [None, (h - 2, w - 3), (1, w), (0, 3)]:
        for threshold, mode in [(0.0, "relative"), (0.6, "relative"), (0.5, "absolute"), (-10.0, "absolute")]:
            for top_k in [None, 3]:
                yx, score = peaks_from_saliency(
                    sal, kernel=kernel, threshold=threshold, threshold_mode=mode, top_k=top_k, valid_hw=valid_hw
                )
                expected = brute_peaks(
                    sal, kernel=kernel, threshold=threshold, mode=mode, top_k=top_k, valid_hw=valid_hw
                )
                assert yx.dtype == torch.int64
                assert [tuple(c) for c in yx.tolist()] == expected, (valid_hw, threshold, mode, top_k)
                assert score.tolist() == [float(sal[y, x]) for y, x in expected]


def test_peaks_hand_made_map():
    sal = torch.tensor(
        [
            [0.0, 1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 5.0, 0.0],
            [3.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 4.0, 0.0, 0.0],
        ]
    )
    # 5 at (1,3) is a peak; 1 at (0,1) has no bigger neighbour within 1 cell; 3 at (2,0) and 4 at (3,2)
    # are 2 columns apart, so both survive a 3x3 window. Order: score descending.
    yx = select_peaks(sal[None], kernel=3, top_k=None)
    assert yx.tolist() == [[1, 3], [3, 2], [2, 0], [0, 1]]
    # A 5x5 window: (3,2) lies within 2 of (1,3) and loses; (2,0) is within 2 of (3,2) and loses too.
    # (0,1) is within 2 of (2,0) only, which is bigger: suppressed.
    assert select_peaks(sal[None], kernel=5, top_k=None).tolist() == [[1, 3]]
    assert select_peaks(sal[None], kernel=3, top_k=2).tolist() == [[1, 3], [3, 2]]
    # Relative threshold 0.7: keep saliency >= 0 + 0.7 * 5 = 3.5.
    assert select_peaks(sal[None], kernel=3, threshold=0.7, top_k=None).tolist() == [[1, 3], [3, 2]]


def test_tie_rule_plateaus_keep_the_first_cell():
    assert select_peaks(torch.ones(3, 6, 5), top_k=None).tolist() == [[0, 0]]
    sal = torch.zeros(5, 6)
    sal[2, 2:5] = 1.0  # a 1x3 plateau
    sal[3, 2:5] = 1.0  # now 2x3
    assert peaks_from_saliency(sal, kernel=3)[0].tolist() == [[2, 2], [0, 0]]
    # The top-left zero survives too: nothing earlier or bigger lies in its window.


def test_padding_never_suppresses_valid_cells():
    sal = torch.zeros(4, 4)
    sal[1, 1] = 1.0
    sal[2, 2] = 9.0  # outside the valid 2x2 region
    assert peaks_from_saliency(sal, kernel=3, valid_hw=(2, 2))[0].tolist() == [[1, 1]]
    assert peaks_from_saliency(sal, kernel=3)[0].tolist() == [[2, 2]]  # (0, 0) now sees the 1 at (1, 1)


def test_saliency_kinds():
    f = torch.tensor([[[1.0, -3.0]], [[-2.0, 2.0]]])  # [C=2, H=1, W=2]
    assert saliency_map(f, "max").tolist() == [[1.0, 2.0]]
    assert saliency_map(f, "mean_abs").tolist() == [[1.5, 2.5]]
    assert select_peaks(f, kernel=3, top_k=None, saliency="max").tolist() == [[0, 1]]
    with pytest.raises(ConfigError):
        saliency_map(f, "sum")
    with pytest.raises(StoreError, match="NaN"):
        peaks_from_saliency(torch.tensor([[0.0, math.nan]]))
    with pytest.raises(ConfigError, match="odd"):
        peaks_from_saliency(torch.zeros(2, 2), kernel=2)


STRIDES = {"p3": 8, "p4": 16, "p5": 32}
SHAPES = {"p3": (16, 16), "p4": (8, 8), "p5": (4, 4)}  # a 128 px canvas


def test_detection_cells_by_size():
    boxes = torch.tensor(
        [
            [10.0, 10.0, 42.0, 42.0],  # size 32 = 4 x 8 -> p3, centre (26, 26) -> cell (3, 3)
            [12.0, 12.0, 40.0, 40.0],  # size 28 -> p3, same cell, lower score: merged
            [0.0, 0.0, 64.0, 64.0],  # size 64 = 4 x 16 -> p4, centre (32, 32) -> cell (2, 2)
            [0.0, 0.0, 128.0, 128.0],  # size 128 -> p5, centre (64, 64) -> (2, 2)
            [100.0, 4.0, 110.0, 14.0],  # size 10 -> p3 (nearest in log scale), centre (105, 9) -> (1, 13)
            [0.0, 0.0, 128.0, 128.0],  # size 128 again, better score
        ]
    )
    scores = torch.tensor([0.9, 0.5, 0.8, 0.3, 0.95, 0.4])
    cells = detection_cells(boxes, scores, strides=STRIDES, level_shapes=SHAPES)
    assert cells["p3"][0].tolist() == [[1, 13], [3, 3]]
    assert cells["p3"][1].tolist() == pytest.approx([0.95, 0.9])
    assert cells["p4"][0].tolist() == [[2, 2]]
    assert cells["p5"][0].tolist() == [[2, 2]] and cells["p5"][1].tolist() == pytest.approx([0.4])
    yx = select_from_detections(boxes, scores, strides=STRIDES, level_shapes=SHAPES, top_k={"p3": 1})
    assert yx["p3"].tolist() == [[1, 13]]
    # A 300 px box is larger than any level's 4 x stride: the coarsest level takes it.
    big = select_from_detections(
        torch.tensor([[0.0, 0.0, 300.0, 300.0]]), torch.tensor([1.0]), strides=STRIDES, level_shapes=SHAPES
    )
    assert big["p5"].tolist() == [[3, 3]] and big["p3"].numel() == 0  # centre 150 / 32 -> 4, clipped to 3


def test_detection_cells_all_levels_and_dilation():
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0], [16.0, 16.0, 40.0, 40.0]])
    scores = torch.tensor([0.5, 0.7])
    cells = select_from_detections(boxes, scores, strides=STRIDES, level_shapes=SHAPES, assign="all")
    assert cells["p3"].tolist() == [[3, 3], [0, 0]]  # centres (4, 4) and (28, 28)
    assert cells["p4"].tolist() == [[1, 1], [0, 0]]
    assert cells["p5"].tolist() == [[0, 0]]  # both boxes on cell (0, 0): one cell, the better score
    dil = detection_cells(boxes, scores, strides=STRIDES, level_shapes=SHAPES, assign="all", dilate=1)
    assert dil["p5"][1].tolist() == pytest.approx([0.7] * 4)
    dil = detection_cells(boxes[:1], scores[:1], strides=STRIDES, level_shapes=SHAPES, dilate=1)
    assert dil["p3"][0].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]  # clipped at the corner, index order
    dil = detection_cells(boxes[1:], scores[1:], strides={"p3": 8}, level_shapes={"p3": (4, 4)}, dilate=1)
    assert dil["p3"][0].tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]  # clipped to the valid 4 x 4
    empty = select_from_detections(torch.zeros(0, 4), torch.zeros(0), strides=STRIDES, level_shapes=SHAPES)
    assert all(v.shape == (0, 2) for v in empty.values())


def test_channel_group_max_pools_contiguous_groups():
    v = torch.tensor([[1.0, 5.0, 2.0, 0.0, -1.0, -2.0, -3.0, -0.5]])
    assert channel_group_max(v, 4, dim=-1).tolist() == [[5.0, -0.5]]
    assert channel_group_max(v, 2, dim=-1).tolist() == [[5.0, 2.0, -1.0, -0.5]]
    dense = v.T.reshape(8, 1, 1)
    assert channel_group_max(dense, 4, dim=0).flatten().tolist() == [5.0, -0.5]
    with pytest.raises(ValueError):
        channel_group_max(v, 3, dim=-1)


def test_default_top_k():
    assert [default_top_k(s) for s in (4, 8, 16, 32, 64, 128)] == [96, 48, 24, 12, 6, 3]


def _features(seed=0, channels=16):
    g = torch.Generator().manual_seed(seed)
    return {lv: torch.randn(channels, h, w, generator=g) * 10 for lv, (h, w) in SHAPES.items()}


def test_policy_select_image_mixed_levels():
    features = _features()
    policy = SelectionPolicy(per_level={"p5": "dense"}, top_k={"p3": 5}, channel_group=4)
    out = policy.select_image(features, image_size=(100, 60), strides=STRIDES)
    # p3: valid 13 x 8 cells (ceil(100/8), ceil(60/8)); p4: 7 x 4 with the default 24 cells (fewer peaks exist).
    for level, valid, k in [("p3", (13, 8), 5), ("p4", (7, 4), 24)]:
        f = features[level]
        yx = select_peaks(f, top_k=k, valid_hw=valid)
        rec = out[level]
        assert rec.yx.dtype == torch.int16 and rec.values.dtype == torch.float16 and rec.score.dtype == torch.float16
        assert rec.yx.long().tolist() == yx.tolist()
        assert (yx[:, 0] < valid[0]).all() and (yx[:, 1] < valid[1]).all()
        expected = f[:, yx[:, 0], yx[:, 1]].T.reshape(len(yx), 4, 4).amax(dim=2)
        assert torch.equal(rec.values, expected.half())
        assert torch.equal(rec.score, f.amax(dim=0)[yx[:, 0], yx[:, 1]].half())
        assert rec.dense is None
    assert out["p3"].num_cells == 5
    dense = out["p5"].dense
    assert dense.dtype == torch.float16 and dense.shape == (4, 4, 2)  # ceil(100/32) x ceil(60/32)
    assert torch.equal(dense, features["p5"][:, :4, :2].reshape(4, 4, 4, 2).amax(dim=1).half())


def test_policy_detections_selector():
    features = _features(1)
    policy = SelectionPolicy(name="detections", channel_group=2)
    det = {"boxes": torch.tensor([[10.0, 10.0, 42.0, 42.0]]), "scores": torch.tensor([0.75])}
    out = policy.select_image(features, image_size=(128, 128), strides=STRIDES, detections=det)
    assert out["p3"].yx.tolist() == [[3, 3]] and out["p3"].score.tolist() == [0.75]
    assert torch.equal(out["p3"].values[0], features["p3"][:, 3, 3].reshape(8, 2).amax(dim=1).half())
    assert out["p4"].num_cells == 0 and out["p4"].values.shape == (0, 8)
    with pytest.raises(StoreError, match="detections"):
        policy.select_image(features, image_size=(128, 128), strides=STRIDES)


def test_policy_select_batch_equals_per_image_selection():
    # Different valid sizes per image (padding differs), all three selectors, a threshold.
    feats = [_features(seed) for seed in range(3)]
    batch = {lv: torch.stack([f[lv] for f in feats]) for lv in SHAPES}
    sizes = [(128, 128), (100, 60), (20, 120)]
    dets = [
        {
            "boxes": torch.tensor([[10.0, 10.0, 42.0, 42.0], [0.0, 0.0, 120.0, 90.0]]),
            "scores": torch.tensor([0.9, 0.6]),
        },
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0)},
        {"boxes": torch.tensor([[4.0, 2.0, 20.0, 18.0]]), "scores": torch.tensor([0.5])},
    ]
    policy = SelectionPolicy(per_level={"p4": "detections", "p5": "dense"}, threshold=0.3, channel_group=2)
    out = policy.select_batch(batch, image_sizes=sizes, strides=STRIDES, detections=dets)
    for i in range(3):
        single = policy.select_image(feats[i], image_size=sizes[i], strides=STRIDES, detections=dets[i])
        assert set(out[i]) == set(single)
        for lv, rec in single.items():
            for name in ("yx", "values", "score", "dense"):
                a, b = getattr(out[i][lv], name), getattr(rec, name)
                assert (a is None and b is None) or torch.equal(a, b), (i, lv, name)
    assert out[2]["p3"].num_cells > 0 and (out[2]["p3"].yx[:, 0] < 3).all()  # 20 px tall: rows 0-2 only


def test_policy_dict_round_trip_and_validation():
    policy = SelectionPolicy(per_level={"p7": "dense"}, top_k={"p3": 10}, kernel=5, threshold=0.2)
    assert SelectionPolicy.from_dict(policy.to_dict()) == policy
    assert policy.top_k_for("p3", 8) == 10 and policy.top_k_for("p4", 16) == 24
    assert SelectionPolicy(top_k=7).top_k_for("p4", 16) == 7
    dense_cap = SelectionPolicy(density=0.05)
    assert dense_cap.top_k_for("p3", 8, (13, 8)) == 6 and dense_cap.top_k_for("p3", 8, (40, 40)) == 48  # ceil(5.2)
    out = dense_cap.select_image(_features(2), image_size=(100, 60), strides=STRIDES)
    assert out["p3"].num_cells == 6 and out["p5"].num_cells == 1  # p5: ceil(0.05 * 4 * 2)
    with pytest.raises(ConfigError, match="density"):
        SelectionPolicy(density=0.0)
    with pytest.raises(ConfigError, match="top_kk"):
        SelectionPolicy.from_dict({"top_kk": 3})
    with pytest.raises(ConfigError, match="per_level"):
        SelectionPolicy(per_level={"p3": "sparse"})
    with pytest.raises(ConfigError, match="kernel"):
        SelectionPolicy(kernel=4)


def test_policy_refuses_bad_features():
    policy = SelectionPolicy()
    with pytest.raises(StoreError, match="NaN"):
        policy.select_image({"p3": torch.full((4, 2, 2), math.nan)}, image_size=(16, 16), strides={"p3": 8})
    with pytest.raises(StoreError, match="float16"):
        policy.select_image({"p3": torch.full((4, 2, 2), 1e6)}, image_size=(16, 16), strides={"p3": 8})
    with pytest.raises(StoreError, match="groups of 4"):
        policy.select_image({"p3": torch.zeros(6, 2, 2)}, image_size=(16, 16), strides={"p3": 8})
