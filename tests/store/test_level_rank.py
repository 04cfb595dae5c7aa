"""Lowrank levels of different ranks (``SelectionPolicy.level_rank``): policy, bases, records, bytes."""

import pytest
import torch

from detkd.data.views import View
from detkd.errors import ConfigError
from detkd.store.bases import fit_bases
from detkd.store.reader import StoreReader
from detkd.store.select import SelectionPolicy
from detkd.store.verify import store_info
from tests.store.test_build import build
from tests.store.test_lowrank import _header_bytes


def test_level_rank_overrides_the_rank_of_lowrank_levels_only():
    policy = SelectionPolicy(name="lowrank", rank=3, level_rank={"p4": 6})
    assert [policy.rank_for(lv) for lv in ("p3", "p4", "p5")] == [3, 6, 3]
    assert SelectionPolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(ConfigError, match=r"level_rank\['p4'\]: must be an integer >= 1"):
        SelectionPolicy(name="lowrank", level_rank={"p4": 0})
    with pytest.raises(ConfigError, match=r"only lowrank levels have a rank, and p7 is 'dense'"):
        SelectionPolicy(name="lowrank", per_level={"p7": "dense"}, level_rank={"p7": 4})
    old = {k: v for k, v in policy.to_dict().items() if k != "level_rank"}  # manifests before it existed
    assert SelectionPolicy.from_dict(old).rank_for("p4") == 3


def test_bases_are_fitted_at_each_levels_rank():
    g = torch.Generator().manual_seed(0)
    feats = {"p3": torch.randn(2, 8, 4, 4, generator=g), "p4": torch.randn(2, 8, 2, 2, generator=g)}
    valid = {"p3": [(4, 4), (3, 4)], "p4": [(2, 2), (2, 1)]}
    bases = fit_bases([(feats, valid)], rank={"p3": 2, "p4": 5}, levels=["p3", "p4"])
    assert bases["p3"].basis.shape == (8, 2) and bases["p4"].basis.shape == (8, 5)
    same = fit_bases([(feats, valid)], rank=5, levels=["p3", "p4"])
    assert torch.equal(same["p4"].basis, bases["p4"].basis)  # the dict only chooses the rank
    assert torch.equal(same["p3"].basis[:, :2], bases["p3"].basis)  # a lower rank: the leading directions


def test_a_store_with_level_ranks_serves_and_projects_them(tmp_path, tiny_source, teacher_ckpt, capsys):
    from detkd.commands.store import run_info

    ckpt, teacher = teacher_ckpt
    policy = SelectionPolicy(name="lowrank", rank=2, level_rank={"p4": 6, "p5": 6}, fit_views=4, value_dtype="int2")
    build(tmp_path, tiny_source, ckpt, "s", policy=policy)
    reader = StoreReader(tmp_path / "s")
    ranks = {lv: policy.rank_for(lv) for lv in teacher.levels}
    assert {lv: b.basis.shape[1] for lv, b in reader.bases.items()} == ranks
    record = reader.read(tiny_source.records[0].image_id, View(64))
    assert {lv: rec.coefficients.shape[0] for lv, rec in record.items()} == ranks
    # COCO scale: 1333 x 800 on strides 8..128; int2 keeps four cells per byte along x.
    cells = {"p3": (100, 167), "p4": (50, 84), "p5": (25, 42), "p6": (13, 21), "p7": (7, 11)}
    expected = 2 + 1 + 16 + 1
    for lv, (h, w) in cells.items():
        r = ranks[lv]
        expected += _header_bytes(f"{lv}/c", (r, h, -(-w // 4))) + r * h * -(-w // 4)
        expected += _header_bytes(f"{lv}/u", (3,)) + 6 + _header_bytes(f"{lv}/m", (r,)) + 2 * r
    assert store_info(tmp_path / "s")["projected_coco"]["bytes_per_view"] == expected
    run_info(type("A", (), {"store": str(tmp_path / "s")})())
    assert "level ranks {'p4': 6, 'p5': 6}" in capsys.readouterr().out
