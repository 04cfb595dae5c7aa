"""A store of some of the teacher's levels (``SelectionPolicy.levels``, ``--levels``): what it holds, what a
byte budget spends, which levels a run from it distills, and the policy's validation."""

import pytest
import torch

from detkd.distill.task import common_levels
from detkd.errors import ConfigError
from detkd.models.builders import build_detector
from detkd.store.bases import load_spectra
from detkd.store.budget import QUANTISED_SHARE, ROUNDING_PENALTY, choose_layout
from detkd.store.format import StoreError
from detkd.store.projection import projected_bytes
from detkd.store.reader import StoreReader
from detkd.store.replay import check_store_for_run
from detkd.store.select import SelectionPolicy
from detkd.store.teacher import SelectingTeacher, StoredTeacher
from detkd.store.verify import store_info
from tests.store.test_build import POLICY, VIEWS, build


def test_a_store_of_some_levels_holds_only_those(tmp_path, tiny_source, teacher_ckpt):
    ckpt, teacher = teacher_ckpt
    policy = SelectionPolicy(name="lowrank", rank=2, fit_views=4, levels=["p5", "p3"])
    manifest = build(tmp_path, tiny_source, ckpt, "some", policy=policy)
    assert manifest.levels == ["p3", "p5"]  # the teacher's order, not the policy's
    assert set(manifest.strides) == set(manifest.channels) == set(manifest.feature_shapes) == {"p3", "p5"}
    reader = StoreReader(tmp_path / "some")
    assert set(reader.bases) == {"p3", "p5"}
    for record in tiny_source.records[:3]:
        assert set(reader.read(record.image_id, VIEWS[0])) == {"p3", "p5"}
    whole = build(tmp_path, tiny_source, ckpt, "whole", policy=SelectionPolicy(name="lowrank", rank=2, fit_views=4))
    full, some = (store_info(tmp_path / d)["bytes_per_image_view"] for d in ("whole", "some"))
    assert 0 < some < full
    # The dropped levels' bytes are all that differs: the same layout over p3 and p5 alone.
    strides = {lv: teacher.strides[lv] for lv in ("p3", "p5")}
    channels = {lv: teacher.channels[lv] for lv in ("p3", "p5")}
    expected = projected_bytes(policy, strides=strides, channels=channels)[0]
    assert store_info(tmp_path / "some")["projected_coco"]["bytes_per_view"] == expected
    assert len(whole.levels) == len(teacher.levels) > 2


def test_a_budget_spends_its_bytes_on_the_stored_levels(tmp_path, tiny_source, teacher_ckpt):
    ckpt, teacher = teacher_ckpt
    everywhere = build(
        tmp_path, tiny_source, ckpt, "all", policy=SelectionPolicy(name="lowrank", budget_kb=24, fit_views=4)
    )
    policy = SelectionPolicy(name="lowrank", budget_kb=24, fit_views=4, levels=["p3"])
    p3 = build(tmp_path, tiny_source, ckpt, "p3", policy=policy)
    assert set(p3.policy["level_rank"]) == {"p3"} and p3.policy["levels"] == ["p3"]
    spectra = load_spectra(tmp_path / "p3")
    expected = choose_layout(policy, spectra, strides={"p3": 8}, channels={"p3": teacher.channels["p3"]})
    assert p3.policy["level_rank"] == expected.level_rank
    assert store_info(tmp_path / "p3")["projected_coco"]["bytes_per_view"] == expected.bytes_per_view <= 24 * 1024
    # The p3 layout of the every-level store fits the budget alone too, so p3 alone keeps at least as much.
    r, dtype = everywhere.policy["level_rank"]["p3"], everywhere.policy["value_dtype"]
    share = float(spectra["p3"][:r].sum() / spectra["p3"].sum())
    assert expected.score >= share * (1 - ROUNDING_PENALTY * (1 - QUANTISED_SHARE[dtype])) - 1e-12


def test_a_run_from_a_store_of_some_levels_distills_those(tmp_path, tiny_source, teacher_ckpt, spec_factory):
    ckpt, _ = teacher_ckpt
    build(tmp_path, tiny_source, ckpt, "p3", policy=SelectionPolicy(name="lowrank", rank=2, fit_views=4, levels=["p3"]))
    reader = StoreReader(tmp_path / "p3")
    student = build_detector(spec_factory("fcos"))
    check_store_for_run(reader, source=tiny_source, policy=POLICY, student=student)  # no distill.levels needed
    assert list(common_levels(student, StoredTeacher(reader))) == ["p3"]
    with pytest.raises(StoreError, match=r"levels: the store holds \['p3'\], distill.levels include \['p4'\]"):
        check_store_for_run(reader, source=tiny_source, policy=POLICY, student=student, levels=["p3", "p4"])
    # A store of every level still asks for distill.levels when the student has a level it lacks.
    build(tmp_path, tiny_source, ckpt, "all", policy=SelectionPolicy(name="lowrank", rank=2, fit_views=4))
    frcnn = build_detector(spec_factory("fasterrcnn"))
    with pytest.raises(StoreError, match=r"include \['p2'\]"):
        check_store_for_run(StoreReader(tmp_path / "all"), source=tiny_source, policy=POLICY, student=frcnn)


def test_online_selection_of_some_levels_offers_only_those(teacher_ckpt, spec_factory):
    _, teacher = teacher_ckpt
    selecting = SelectingTeacher(teacher, SelectionPolicy(levels=["p4", "p3"]))
    assert selecting.levels == ["p3", "p4"] and set(selecting.strides) == {"p3", "p4"}
    assert selecting.offer().levels == ("p3", "p4")
    student = build_detector(spec_factory("fcos"))
    assert list(common_levels(student, selecting)) == ["p3", "p4"]
    batch = torch.zeros(1, 3, 64, 64)
    knowledge = selecting.knowledge(type("B", (), {"images": batch, "image_sizes": [(64, 64)]})(), frozenset())
    assert set(knowledge.cells) == {"p3", "p4"}
    with pytest.raises(ConfigError, match=r"online selection levels \['p9'\]"):
        SelectingTeacher(teacher, SelectionPolicy(levels=["p9"]))


def test_a_build_naming_a_level_the_teacher_lacks_is_refused(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    with pytest.raises(StoreError, match=r"names level\(s\) \['p9'\]; the teacher's levels are"):
        build(tmp_path, tiny_source, ckpt, "bad", policy=SelectionPolicy(levels=["p3", "p9"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": []}, "a non-empty list of level names"),
        ({"levels": "p3"}, "a non-empty list of level names"),
        ({"levels": ["p3", "p3"]}, "names a level twice"),
        ({"levels": ["p3"], "per_level": {"p4": "dense"}}, r"per_level: level\(s\) \['p4'\] are not among"),
        ({"levels": ["p3"], "top_k": {"p5": 4}}, r"top_k: level\(s\) \['p5'\] are not among"),
        ({"name": "lowrank", "levels": ["p3"], "level_rank": {"p4": 2}}, r"level_rank: level\(s\) \['p4'\]"),
        ({"name": "lowrank", "levels": ["p3"], "pool": {"p4": 2}}, r"pool: level\(s\) \['p4'\]"),
    ],
)
def test_levels_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SelectionPolicy(**kwargs)


def test_an_old_policy_without_levels_stores_every_level():
    old = SelectionPolicy().to_dict()
    del old["levels"]
    policy = SelectionPolicy.from_dict(old)
    assert policy.levels is None and policy.stored_levels(["p3", "p4"]) == ["p3", "p4"]
