"""A lowrank store fitted to a byte budget (``detkd.store.budget``): the codec's kept shares, the layout
choice against exhaustive search, the policy's validation, the spectra in ``bases.pt`` and a real build."""

import itertools
import math

import pytest
import torch

from detkd.errors import ConfigError
from detkd.store.bases import BasisFit, load_bases, load_spectra, save_bases
from detkd.store.budget import QUANTISED_SHARE, ROUNDING_PENALTY, choose_layout, fit_to_budget
from detkd.store.codec import as_stored
from detkd.store.format import LevelRecord, StoreError
from detkd.store.projection import projected_bytes
from detkd.store.reader import StoreReader
from detkd.store.select import SelectionPolicy
from detkd.store.verify import store_info
from tests.store.test_build import VIEWS, build

STRIDES = {"p3": 8, "p4": 16, "p5": 32}
CHANNELS = {"p3": 6, "p4": 6, "p5": 6}
CELLS = {"p3": 100 * 167, "p4": 50 * 84, "p5": 25 * 42}  # COCO 1333 x 800 at strides 8, 16, 32
COCO_CELLS = [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]  # ... and 64, 128


@pytest.mark.parametrize("dtype", ["int2", "int4"])
def test_the_kept_share_of_each_dtype_is_what_the_codec_keeps_of_gaussian_maps(dtype):
    g = torch.Generator().manual_seed(0)
    c = torch.randn(16, 100, 167, generator=g)  # a p3 coefficient map at COCO scale
    back = as_stored({"p3": LevelRecord(coefficients=c)}, value_dtype=dtype)["p3"].coefficients.float()
    kept = 1 - (back - c).pow(2).sum() / c.pow(2).sum()
    assert float(kept) == pytest.approx(QUANTISED_SHARE[dtype], abs=0.003)


def _spectra(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {lv: torch.rand(6, generator=g, dtype=torch.float64).pow(3).sort(descending=True).values for lv in STRIDES}


def _score(share: float, dtype: str) -> float:
    return share * (1 - ROUNDING_PENALTY * (1 - QUANTISED_SHARE[dtype]))


def _objective(spectra, ranks, dtype):
    shares = {lv: float(s[: ranks[lv]].sum() / s.sum()) for lv, s in spectra.items()}
    return _score(sum(CELLS[lv] * shares[lv] for lv in STRIDES) / sum(CELLS.values()), dtype)


def _size(policy, ranks, dtype):
    layout = SelectionPolicy(name="lowrank", value_dtype=dtype, level_rank=ranks, rank=max(ranks.values()))
    return projected_bytes(layout, strides=STRIDES, channels=CHANNELS)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget_kb", [12.0, 20.0, 31.5])
def test_the_chosen_layout_is_the_best_an_exhaustive_search_finds(seed, budget_kb):
    spectra = _spectra(seed)
    policy = SelectionPolicy(name="lowrank", budget_kb=budget_kb)
    choice = choose_layout(policy, spectra, strides=STRIDES, channels=CHANNELS)
    best = None  # slow reference: every rank combination of both dtypes, scored independently
    for dtype, step in (("int2", 1), ("int4", 2)):
        for combo in itertools.product(range(step, 7, step), repeat=3):
            ranks = dict(zip(STRIDES, combo, strict=True))
            if _size(policy, ranks, dtype) <= budget_kb * 1024:
                score = _objective(spectra, ranks, dtype)
                if best is None or score > best[0] + 1e-12:
                    best = (score, dtype, ranks)
    assert choice.score == pytest.approx(best[0], rel=1e-9)
    assert choice.kept == pytest.approx(best[0] / _score(1, best[1]) * QUANTISED_SHARE[best[1]], rel=1e-9)
    assert (choice.value_dtype, choice.level_rank) == (best[1], best[2]) and list(choice.level_rank) == list(STRIDES)
    assert choice.bytes_per_view == _size(policy, choice.level_rank, choice.value_dtype) <= budget_kb * 1024


def test_the_rounding_penalty_orders_the_dtypes_as_measured_on_shapes():
    # Cell-weighted variance shares of the shapes teacher's --budget-kb stores (their bases' spectra) and
    # DeFeat's AP from them (benchmarks/results/shapes_store_budget{32,32_int4,128,128_int4}.json):
    # 32 KB: int2 0.2707 -> 9.9, int4 0.1586 -> 8.8; 128 KB: int2 0.5224 -> 11.0, int4 0.3837 -> 11.5.
    assert _score(0.2707, "int2") > _score(0.1586, "int4") and _score(0.3837, "int4") > _score(0.5224, "int2")
    # plain variance after rounding (no penalty) would pick int2 at both budgets
    assert 0.3837 * QUANTISED_SHARE["int4"] < 0.5224 * QUANTISED_SHARE["int2"]


def test_a_named_dtype_limits_the_choice_and_int4_keeps_even_ranks():
    policy = SelectionPolicy(name="lowrank", budget_kb=31.5, value_dtype="int4")
    choice = choose_layout(policy, _spectra(0), strides=STRIDES, channels=CHANNELS)
    assert choice.value_dtype == "int4" and all(r % 2 == 0 for r in choice.level_rank.values())
    # maximal: one more step on any level would not fit
    for lv, r in choice.level_rank.items():
        if r + 2 <= 6:
            assert _size(policy, {**choice.level_rank, lv: r + 2}, "int4") > 31.5 * 1024


def test_a_budget_too_small_for_rank_one_is_refused_with_the_smallest_size():
    policy = SelectionPolicy(name="lowrank", budget_kb=2)
    smallest = _size(policy, dict.fromkeys(STRIDES, 1), "int2")
    with pytest.raises(
        StoreError, match=rf"cannot hold even the smallest lowrank layout \({smallest / 1024:.1f} KB: int2 at rank 1"
    ):
        choose_layout(policy, _spectra(0), strides=STRIDES, channels=CHANNELS)


def test_the_resolved_policy_records_the_choice_and_the_budget():
    policy = SelectionPolicy(name="lowrank", budget_kb=20)
    assert policy.value_dtype == "auto" and policy.unresolved_budget
    resolved = fit_to_budget(policy, _spectra(1), strides=STRIDES, channels=CHANNELS)
    choice = choose_layout(policy, _spectra(1), strides=STRIDES, channels=CHANNELS)
    assert not resolved.unresolved_budget and resolved.budget_kb == 20
    assert (resolved.value_dtype, resolved.level_rank) == (choice.value_dtype, choice.level_rank)
    assert SelectionPolicy.from_dict(resolved.to_dict()) == resolved
    old = {k: v for k, v in SelectionPolicy(name="lowrank").to_dict().items() if k != "budget_kb"}
    assert SelectionPolicy.from_dict(old).budget_kb is None  # manifests before budgets read as before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget_kb": 0}, "must be a positive number"),
        ({"budget_kb": math.inf}, "must be a positive number"),
        ({"name": "nms-ksd", "budget_kb": 32}, "use --policy lowrank at every level"),
        ({"per_level": {"p7": "dense"}, "budget_kb": 32}, "use --policy lowrank at every level"),
        ({"pool": {"p3": 2}, "budget_kb": 32}, "either a byte budget or pooled levels"),
        ({"value_dtype": "float16", "budget_kb": 32}, "among int2 and int4 coefficients, not 'float16'"),
        ({"value_dtype": "auto"}, "only a byte budget"),
    ],
)
def test_budget_policies_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SelectionPolicy(**{"name": "lowrank", **kwargs})


def test_spectra_are_kept_beside_the_bases_and_old_files_have_none(tmp_path):
    fit = BasisFit(5)
    fit.add(torch.randn(40, 5, generator=torch.Generator().manual_seed(0)))
    spectrum = fit.spectrum()
    assert torch.all(spectrum[:-1] >= spectrum[1:])
    assert float(spectrum[:2].sum() / spectrum.sum()) == pytest.approx(fit.basis(2).kept, rel=1e-12)
    (tmp_path / "a").mkdir()
    save_bases(tmp_path / "a", {"p3": fit.basis(2)}, {"p3": spectrum})
    assert torch.equal(load_spectra(tmp_path / "a")["p3"], spectrum)
    (tmp_path / "b").mkdir()
    save_bases(tmp_path / "b", {"p3": fit.basis(2)})
    assert load_spectra(tmp_path / "b") is None and load_bases(tmp_path / "b")["p3"].rank == 2


def test_a_budgeted_build_stores_the_chosen_layout_and_resumes_with_it(tmp_path, tiny_source, teacher_ckpt):
    ckpt, teacher = teacher_ckpt
    policy = SelectionPolicy(name="lowrank", budget_kb=6, fit_views=4)
    manifest = build(tmp_path, tiny_source, ckpt, "s", policy=policy)
    chosen = SelectionPolicy.from_dict(manifest.policy)
    assert (
        chosen.budget_kb == 6
        and chosen.value_dtype in ("int2", "int4")
        and set(chosen.level_rank) == set(teacher.levels)
    )
    reader = StoreReader(tmp_path / "s")
    assert {lv: b.rank for lv, b in reader.bases.items()} == chosen.level_rank
    projected = store_info(tmp_path / "s")["projected_coco"]["bytes_per_view"]
    spectra = load_spectra(tmp_path / "s")
    expected = choose_layout(policy, spectra, strides=teacher.strides, channels=teacher.channels)
    assert projected == expected.bytes_per_view <= 6 * 1024
    again = build(tmp_path, tiny_source, ckpt, "s", policy=policy)  # a rerun resolves the same layout
    assert again.policy == manifest.policy
    build(tmp_path, tiny_source, ckpt, "plain", policy=SelectionPolicy(name="lowrank", rank=2, fit_views=4))
    with pytest.raises(StoreError, match="fitted without a byte budget"):
        build(tmp_path, tiny_source, ckpt, "plain", policy=policy)


def test_a_plan_answers_what_a_budgeted_build_would_choose(tmp_path, tiny_source, teacher_ckpt):
    from detkd.store.plan import plan_budgets, plan_table

    ckpt, teacher = teacher_ckpt
    plans = plan_budgets(
        teacher_checkpoint=ckpt, source=tiny_source, views=VIEWS, canvas=64, budgets_kb=[0.5, 6, 12], fit_views=4
    )
    assert [p.budget_kb for p in plans] == [0.5, 6, 12] and plans[0].choice is None
    assert "cannot hold even the smallest lowrank layout" in plans[0].reason
    manifest = build(tmp_path, tiny_source, ckpt, "s", policy=SelectionPolicy(name="lowrank", budget_kb=6, fit_views=4))
    assert plans[1].choice.level_rank == manifest.policy["level_rank"]  # the same fit, the same choice
    assert plans[1].choice.value_dtype == manifest.policy["value_dtype"]
    assert plans[1].choice.kept < plans[2].choice.kept and plans[2].choice.bytes_per_view <= 12 * 1024
    dense = sum(2 * teacher.channels[lv] * h * w for lv, (h, w) in zip(teacher.levels, COCO_CELLS, strict=True))
    assert plans[1].dense_bytes == dense
    table = plan_table(plans)
    assert table[3] == "| 0.5 KB | too small | | | | |" and table[-1].startswith("0.5 KB: a budget of 0.5 KB")
    ranks = ", ".join(f"{lv} {r}" for lv, r in plans[1].choice.level_rank.items())
    assert f"| 6 KB | {plans[1].choice.value_dtype} | {ranks} |" in table[4]


def test_stored_importance_maps_count_against_the_budget(tmp_path, tiny_source, teacher_ckpt):
    # GKD's maps take 2 B per cell at every level (about 44 KB at COCO scale) out of the same budget
    ckpt, _ = teacher_ckpt
    policy = SelectionPolicy(name="lowrank", budget_kb=64, fit_views=4)
    plain = build(tmp_path, tiny_source, ckpt, "plain", policy=policy)
    maps = build(tmp_path, tiny_source, ckpt, "maps", policy=policy, with_importance=True)
    assert store_info(tmp_path / "maps")["projected_coco"]["bytes_per_view"] <= 64 * 1024
    assert sum(maps.policy["level_rank"].values()) < sum(plain.policy["level_rank"].values())
