"""The lowrank store encoding: fitted bases, coefficient maps, their bytes, and what methods see."""

import dataclasses
import json

import pytest
import torch

from detkd.data.views import View
from detkd.distill.base import DistillContext, LevelSpec
from detkd.distill.capabilities import check_servable
from detkd.distill.defeat import DeFeat
from detkd.distill.gkd import GKD
from detkd.errors import ConfigError
from detkd.knowledge import ChannelBasis, TeacherKnowledge
from detkd.store.bases import BASES, BasisFit, bases_bytes, bases_sha256, load_bases
from detkd.store.codec import as_stored, decode_levels, encode_levels
from detkd.store.collate import collate_knowledge
from detkd.store.format import LevelRecord, StoreError, decode_record, encode_record
from detkd.store.mirror import mirror_levels
from detkd.store.reader import StoreReader
from detkd.store.select import SelectionPolicy
from detkd.store.teacher import SelectingTeacher, StoredTeacher
from tests.store.test_build import build, replay, teacher_features, valid

QMAX = {"int8": 127, "int4": 7}


def random_basis(c: int, r: int, seed: int = 0) -> ChannelBasis:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    return ChannelBasis(mean=torch.randn(c, generator=g), basis=q[:, :r].float().contiguous())


def test_fitted_basis_is_the_principal_subspace_of_the_cells():
    g = torch.Generator().manual_seed(1)
    # Cells with three strong directions and weak noise: the fit must find those three.
    directions = torch.linalg.qr(torch.randn(12, 3, generator=g))[0]
    x = torch.randn(500, 3, generator=g) * torch.tensor([5.0, 3.0, 2.0]) @ directions.T
    x = x + 0.01 * torch.randn(500, 12, generator=g) + 4.0
    fit = BasisFit(12)
    fit.add(x[:200])
    fit.add(x[200:])  # accumulated in pieces: same moments
    b = fit.basis(3)
    torch.testing.assert_close(b.basis.T @ b.basis, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.mean, x.mean(0), atol=1e-5, rtol=0)
    # Reference: SVD of the centred cells, slow and independent of the moment accumulation.
    _, _, v = torch.linalg.svd((x - x.mean(0)).double(), full_matrices=False)
    ref = v[:3].T.float()
    torch.testing.assert_close((b.basis.T @ ref).abs(), torch.eye(3), atol=1e-4, rtol=0)
    assert (b.basis[b.basis.abs().argmax(0), torch.arange(3)] > 0).all()  # sign convention
    proj = b.project(x, dim=1)
    torch.testing.assert_close(b.project(proj, dim=1), proj, atol=1e-4, rtol=0)  # a projection: idempotent
    assert (proj - x).pow(2).mean() < 1e-3  # nearly all of x lies in the subspace
    with pytest.raises(StoreError, match="rank 13"):
        fit.basis(13)
    # The share of variance kept: top singular values squared over all of them (the same SVD).
    s = torch.linalg.svdvals((x - x.mean(0)).double()) ** 2
    for rank in (1, 2, 3, 12):
        assert fit.basis(rank).kept == pytest.approx(float(s[:rank].sum() / s.sum()), rel=1e-6)
    assert fit.basis(1).kept == pytest.approx(25 / 38, abs=0.02)  # variances 25, 9, 4 and a little noise


def test_bases_files_keep_the_kept_share_and_old_files_still_read(tmp_path):
    from detkd.knowledge import ChannelBasis
    from detkd.store.bases import BASES, bases_bytes, load_bases

    g = torch.Generator().manual_seed(2)
    mean, basis = torch.randn(6, generator=g), torch.linalg.qr(torch.randn(6, 2, generator=g))[0]
    (tmp_path / BASES).write_bytes(bases_bytes({"p3": ChannelBasis(mean=mean, basis=basis, kept=0.4375)}))
    assert load_bases(tmp_path)["p3"].kept == 0.4375
    (tmp_path / BASES).write_bytes(bases_bytes({"p3": ChannelBasis(mean=mean, basis=basis)}))  # as before
    old = load_bases(tmp_path)["p3"]
    assert old.kept is None and torch.equal(old.basis, basis) and torch.equal(old.mean, mean)


@pytest.mark.parametrize("value_dtype", ["float16", "int8", "int4"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coefficients_round_trip_within_their_bound(value_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(4, 5, 7, generator=g) * torch.tensor([10.0, 1.0, 0.1, 0.0])[:, None, None]
    levels = {"p3": LevelRecord(coefficients=c.half())}
    arrays = encode_levels(levels, feature_shapes={"p3": (5, 7)}, value_dtype=value_dtype)
    back = decode_levels(decode_record(encode_record(arrays)), feature_shapes={"p3": (5, 7)})["p3"].coefficients
    assert back.dtype == torch.float16 and back.shape == c.shape
    ref = c.half().float()
    if value_dtype == "float16":
        assert torch.equal(back.float(), ref)
    else:
        # One scale per component: half a step of max |c_k| / qmax, plus the float16 rounding of the result.
        step = ref.abs().amax(dim=(1, 2)) / QMAX[value_dtype]
        bound = step[:, None, None] / 2 * 1.002 + ref.abs() * 2e-3 + 1e-6
        assert ((back.float() - ref).abs() <= bound).all()
        assert torch.equal(back[3], torch.zeros_like(back[3]))  # an all-zero component stays zero
    assert torch.equal(as_stored(levels, value_dtype=value_dtype)["p3"].coefficients, back)


def _varint_bytes(n: int) -> int:
    return max(1, -(-n.bit_length() // 7))  # 7 bits per byte


def _header_bytes(name: str, shape: tuple[int, ...]) -> int:
    # name_len, name, dtype, ndim, then each dim as a varint
    return 1 + len(name.encode()) + 1 + 1 + sum(_varint_bytes(d) for d in shape)


@pytest.mark.parametrize(("value_dtype", "per_cell"), [("float16", 2.0), ("int8", 1.0), ("int4", 0.5)])
def test_encoded_bytes_equal_the_layout_arithmetic(value_dtype, per_cell):
    r, shapes = 4, {"p3": (9, 11), "p4": (5, 6), "p5": (3, 3)}
    levels = {lv: LevelRecord(coefficients=torch.randn(r, h, w).half()) for lv, (h, w) in shapes.items()}
    blob = encode_record(encode_levels(levels, feature_shapes=shapes, value_dtype=value_dtype))
    # Preamble 2 + 1 + 16, array count varint, then per level the "c" array (and "k": r float16 scales).
    expected = 2 + 1 + 16 + 1
    for lv, (h, w) in shapes.items():
        c_shape = (r // 2 if value_dtype == "int4" else r, h, w)
        expected += _header_bytes(f"{lv}/c", c_shape) + int(per_cell * r * h * w)
        if value_dtype != "float16":
            expected += _header_bytes(f"{lv}/k", (r,)) + 2 * r
    assert len(blob) == expected


def test_methods_compare_the_student_projected_on_the_stored_basis():
    basis = random_basis(6, 2, seed=3)
    g = torch.Generator().manual_seed(4)
    t_full, s = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    t = basis.project(t_full)
    knowledge = TeacherKnowledge(features={"p3": t}, bases={"p3": basis})
    matched = knowledge.match("p3", s)
    # The squared distance the method sees is the distance of the coefficients (an orthonormal basis).
    dist = (matched - t).pow(2).sum()
    coeff = (basis.coefficients(s) - basis.coefficients(t_full)).pow(2).sum()
    torch.testing.assert_close(dist, coeff, rtol=1e-5, atol=1e-5)
    assert TeacherKnowledge(features={"p3": t}).match("p3", s) is s  # no basis, no grouping: unchanged
    # DeFeat on a basis: the same loss as DeFeat with teacher and student both projected by hand.
    spec = {"p3": LevelSpec(student_channels=6, teacher_channels=6, stride=8)}
    torch.manual_seed(0)
    method = DeFeat(levels=spec)
    ctx = DistillContext(targets=[{"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0]])}] * 2, image_sizes=[(32, 32)] * 2)
    adapted = method.adapters["p3"](s)
    by_hand = DeFeat(levels=spec)
    by_hand.load_state_dict(method.state_dict())
    by_hand.adapters["p3"] = torch.nn.Identity()
    got = method({"p3": s}, knowledge, ctx)
    want = by_hand({"p3": basis.project(adapted)}, TeacherKnowledge(features={"p3": t}), ctx)
    for key in want:
        torch.testing.assert_close(got[key], want[key])


def test_lowrank_store_serves_the_projected_teacher_maps(tmp_path, tiny_source, teacher_ckpt):
    ckpt, teacher = teacher_ckpt
    policy = SelectionPolicy(name="lowrank", rank=4, value_dtype="int8", fit_views=8)
    manifest = build(tmp_path, tiny_source, ckpt, "s", batch_size=3, policy=policy)
    assert manifest.encoding["name"] == "lowrank" and manifest.encoding["rank"] == 4
    assert policy.channel_group == 1  # lowrank's default: full-width maps, projected
    reader = StoreReader(tmp_path / "s")
    bases = reader.bases
    assert set(bases) == set(teacher.levels) and all(b.basis.shape == (16, 4) for b in bases.values())
    offer = reader.offer()
    assert offer.sparse_levels == () and not offer.importance
    for index, view in [(0, View(64)), (3, View(64, flip=True))]:
        batch = replay(tiny_source, index, view)
        feats = teacher_features(teacher, batch)
        record = reader.read(tiny_source.records[index].image_id, view)
        batch = dataclasses.replace(batch, knowledge=[record])
        knowledge = StoredTeacher(reader).knowledge(batch, frozenset({"features"}))
        assert knowledge.bases is not None and knowledge.channel_group == 1
        for lv, f in feats.items():
            vh, vw = valid(f.shape[-2:], batch.image_sizes[0], teacher.strides[lv])
            want = bases[lv].project(f[:, :vh, :vw], dim=0)
            got = knowledge.features[lv][0, :, :vh, :vw]
            # int8 per component: half a step of each coefficient map's peak, through an orthonormal basis.
            coeff = bases[lv].coefficients(f[:, :vh, :vw], dim=0)
            bound = (coeff.abs().amax(dim=(1, 2)) / 127 / 2).pow(2).sum().sqrt() * 1.01 + 1e-2
            assert (got - want).pow(2).sum(0).sqrt().max() <= bound
            outside = knowledge.features[lv][0, :, vh:, :]
            assert torch.equal(outside, torch.zeros_like(outside))


def test_lowrank_build_resumes_with_its_bases_and_checks_them(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    policy = SelectionPolicy(name="lowrank", rank=2, fit_views=4)
    first = build(tmp_path, tiny_source, ckpt, "s", policy=policy)
    blob = (tmp_path / "s" / BASES).read_bytes()
    again = build(tmp_path, tiny_source, ckpt, "s", policy=SelectionPolicy(name="lowrank", rank=2, fit_views=4))
    assert again.encoding == first.encoding and (tmp_path / "s" / BASES).read_bytes() == blob
    path = tmp_path / "s" / BASES
    other = {lv: random_basis(16, 2) for lv in load_bases(tmp_path / "s")}
    from detkd.store.bases import bases_bytes

    path.write_bytes(bases_bytes(other))
    with pytest.raises(StoreError, match="sha256 does not match"):
        _ = StoreReader(tmp_path / "s").bases
    path.write_bytes(b"not a torch file")
    with pytest.raises(StoreError, match="bases"):
        load_bases(tmp_path / "s")
    path.unlink()
    with pytest.raises(StoreError, match="bases.pt: missing"):
        _ = StoreReader(tmp_path / "s").bases


def test_lowrank_settings_that_cannot_work_are_refused(tmp_path, tiny_source, teacher_ckpt):
    ckpt, teacher = teacher_ckpt
    with pytest.raises(ConfigError, match="channel_group 1"):
        SelectionPolicy(name="lowrank", channel_group=4)
    with pytest.raises(ConfigError, match="rank and fit_views"):
        SelectionPolicy(name="lowrank", rank=0)
    with pytest.raises(StoreError, match="odd number per cell"):
        build(tmp_path, tiny_source, ckpt, "a", policy=SelectionPolicy(name="lowrank", rank=3, value_dtype="int4"))
    with pytest.raises(StoreError, match="exceeds the channels"):
        build(tmp_path, tiny_source, ckpt, "b", policy=SelectionPolicy(name="lowrank", rank=32, value_dtype="int8"))
    with pytest.raises(ConfigError, match="online selection cannot use the lowrank"):
        SelectingTeacher(teacher, SelectionPolicy(name="lowrank"))


def test_methods_are_checked_against_a_lowrank_store_before_training(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    spec = {lv: LevelSpec(student_channels=8, teacher_channels=16, stride=s) for lv, s in [("p3", 8), ("p4", 16)]}
    build(tmp_path, tiny_source, ckpt, "plain", policy=SelectionPolicy(name="lowrank", rank=2, fit_views=4))
    offer = StoreReader(tmp_path / "plain").offer()
    check_servable({"defeat": DeFeat(levels=spec)}, offer)  # whole maps: served
    with pytest.raises(ConfigError, match="gradient-importance maps .* --importance --policy lowrank"):
        check_servable({"gkd": GKD(levels=spec)}, offer)
    build(
        tmp_path,
        tiny_source,
        ckpt,
        "imp",
        policy=SelectionPolicy(name="lowrank", rank=2, fit_views=4),
        with_importance=True,
    )
    reader = StoreReader(tmp_path / "imp")
    check_servable({"gkd": GKD(levels=spec)}, reader.offer())
    record = reader.read(tiny_source.records[1].image_id, View(64))
    assert record["p3"].coefficients is not None and record["p3"].extras["gi"].shape[-2:] == record["p3"].map_hw
    batch = dataclasses.replace(replay(tiny_source, 1, View(64)), knowledge=[record])
    knowledge = StoredTeacher(reader).knowledge(batch, frozenset({"features", "importance"}))
    assert knowledge.features["p3"].shape == (1, 16, 8, 8) and knowledge.importance["p3"].shape == (1, 1, 8, 8)


def test_stored_teacher_serves_coefficients_when_the_task_allows(tmp_path, tiny_source, teacher_ckpt):
    ckpt, _ = teacher_ckpt
    build(tmp_path, tiny_source, ckpt, "s", policy=SelectionPolicy(name="lowrank", rank=2, fit_views=4))
    reader = StoreReader(tmp_path / "s")
    record = reader.read(tiny_source.records[1].image_id, View(64))
    batch = dataclasses.replace(replay(tiny_source, 1, View(64)), knowledge=[record])
    teacher = StoredTeacher(reader)
    maps = teacher.knowledge(batch, frozenset({"features"}))
    coef = teacher.knowledge(batch, frozenset({"features", "coefficients"}))
    assert not maps.coefficients and coef.coefficients
    assert maps.features["p3"].shape == (1, 16, 8, 8) and coef.features["p3"].shape == (1, 2, 8, 8)
    for lv, basis in coef.bases.items():
        torch.testing.assert_close(basis.reconstruct(coef.features[lv]), basis.project(maps.features[lv]))


def test_mirrored_and_collated_coefficients():
    basis = random_basis(6, 2)
    c = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4).half()
    rec = {"p3": LevelRecord(coefficients=c, extras={"gi": torch.ones(1, 3, 4).half()})}
    flipped = mirror_levels(rec, image_size=(24, 32), strides={"p3": 8})["p3"]
    assert torch.equal(flipped.coefficients, c.flip(-1)) and flipped.dense is None
    k = collate_knowledge([rec, rec], feature_shapes={"p3": (4, 5)}, channel_group=1, bases={"p3": basis})
    assert k.features["p3"].shape == (2, 6, 4, 5) and k.bases["p3"] is basis
    torch.testing.assert_close(k.features["p3"][1, :, :3, :4], basis.reconstruct(c.float(), dim=0))
    with pytest.raises(StoreError, match="no basis was given"):
        collate_knowledge([rec], feature_shapes={"p3": (4, 5)}, channel_group=1)
    with pytest.raises(StoreError, match="basis of rank 3"):
        collate_knowledge([rec], feature_shapes={"p3": (4, 5)}, channel_group=1, bases={"p3": random_basis(6, 3)})


def test_info_projects_the_bytes_per_view_at_coco_scale(tmp_path, tiny_source, teacher_ckpt, capsys):
    from detkd.commands.store import run_info
    from detkd.store.projection import projected_record_bytes
    from detkd.store.verify import store_info

    ckpt, _ = teacher_ckpt
    build(tmp_path, tiny_source, ckpt, "s", policy=SelectionPolicy(name="lowrank", rank=4, fit_views=4))
    info = store_info(tmp_path / "s")
    coco = info["projected_coco"]
    # 1333 x 800 on strides 8..128 (ceil): p3 100 x 167, p4 50 x 84, p5 25 x 42, p6 13 x 21, p7 7 x 11.
    cells = {"p3": (100, 167), "p4": (50, 84), "p5": (25, 42), "p6": (13, 21), "p7": (7, 11)}
    expected = 2 + 1 + 16 + 1  # preamble and array count
    for lv, (h, w) in cells.items():
        expected += _header_bytes(f"{lv}/c", (2, h, w)) + (4 // 2) * h * w  # int4: two coefficients per byte
        expected += _header_bytes(f"{lv}/k", (4,)) + 2 * 4
    assert coco["bytes_per_view"] == expected
    assert coco["dense_fp16_bytes_per_view"] == sum(2 * 16 * h * w for h, w in cells.values())
    run_info(type("A", (), {"store": str(tmp_path / "s")})())
    out = capsys.readouterr().out
    assert "encoding lowrank v1 rank 4" in out
    kept = {lv: b.kept for lv, b in StoreReader(tmp_path / "s").bases.items()}
    assert info["kept_variance"] == {lv: round(v, 4) for lv, v in kept.items()} and all(
        0 < v <= 1 for v in kept.values()
    )
    assert "variance kept by the basis (fit sample): p3 " in out
    # A store built before the share was recorded says so, and what it means for `auto` weights.
    old = {lv: type(b)(mean=b.mean, basis=b.basis) for lv, b in StoreReader(tmp_path / "s").bases.items()}
    (tmp_path / "s" / BASES).write_bytes(bases_bytes(old))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["encoding"]["sha256"] = bases_sha256(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    assert store_info(tmp_path / "s")["kept_variance"] is None
    run_info(type("A", (), {"store": str(tmp_path / "s")})())
    assert "variance kept by the basis: not recorded (built by an older detkd)" in capsys.readouterr().out
    assert f"projected at COCO scale (1333x800 images, these levels and channels): {expected / 1024:.1f} KB" in out
    # Sparse policies project their cell budget, not the map: nms-ksd keeps 384 // stride cells per level.
    build(tmp_path, tiny_source, ckpt, "n", policy=SelectionPolicy(name="nms-ksd", top_k=10))
    sparse = projected_record_bytes(StoreReader(tmp_path / "n").manifest)
    assert sparse["bytes_per_view"] < expected and sparse["image_hw"] == [800, 1333]


def test_stores_written_before_the_lowrank_encoding_still_read(tmp_path, tiny_source, teacher_ckpt):
    import json

    ckpt, _ = teacher_ckpt
    build(tmp_path, tiny_source, ckpt, "old", policy=SelectionPolicy(name="dense", channel_group=2))
    path = tmp_path / "old" / "manifest.json"
    manifest = json.loads(path.read_text())
    # What an earlier detkd wrote: no "encoding", no rank / fit_views in the policy, channel_group explicit.
    del manifest["encoding"]
    for key in ("rank", "fit_views"):
        del manifest["policy"][key]
    path.write_text(json.dumps(manifest))
    reader = StoreReader(tmp_path / "old")
    assert reader.bases is None and reader.policy.channel_group == 2 and reader.manifest.encoding == {}
    record = reader.read(tiny_source.records[0].image_id, View(64))
    knowledge = StoredTeacher(reader).knowledge(
        dataclasses.replace(replay(tiny_source, 0, View(64)), knowledge=[record]), frozenset({"features"})
    )
    assert knowledge.bases is None and knowledge.features["p3"].shape == (1, 8, 8, 8)
