"""``detkd store build | merge | info | verify`` on a random-init teacher and a tiny synthetic data set."""

import lmdb
import pytest
import torch

from detkd.cli import main
from detkd.models.builders import DetectorSpec, build_detector
from detkd.models.checkpoint import save_checkpoint
from detkd.store.lmdb_env import release


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from detkd.data.formats.detect import open_source
    from detkd.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("store_cli")
    data = generate_synthetic(root / "data", num_train=6, num_val=2, image_size=64, seed=0)
    names = open_source(data, format="coco", split="train").class_names
    torch.manual_seed(0)
    spec = DetectorSpec(family="fcos", num_classes=len(names), fpn_channels=16, head_convs=1)
    save_checkpoint(root / "t.pt", build_detector(spec), class_names=names, extra={"metrics": {"AP": 0.4}})
    return root, data


def store_build(root, data, out, *extra):
    args = ["store", "build", "--teacher", str(root / "t.pt"), "--data", str(data), "--size", "64"]
    return main([*args, "--workers", "0", "--no-progress", "--out", str(root / out), *extra])


def test_build_info_verify_and_a_damaged_record(setup, capsys):
    root, data = setup
    assert store_build(root, data, "s", "--top-k", "p3=4,p4=2", "--channel-group", "2") == 0
    out = capsys.readouterr().out
    assert "complete" in out and "AP (x100) 40.0" in out and "policy nms-ksd  channel_group 2" in out
    assert "6 images, 12 image-views" in out and "views s64, s64-flip" in out and "over 1 run(s)" in out
    # Dense fp16 FPN maps of a 64 px canvas: 16 channels x (64 + 16 + 4 + 1 + 1) cells x 2 bytes.
    assert "dense fp16 maps of the stored levels" in out and " vs 2752 dense" in out
    assert main(["store", "info", str(root / "s")]) == 0
    assert "teacher sha256" in capsys.readouterr().out
    assert main(["store", "verify", str(root / "s")]) == 0
    assert "12 records, 6 images" in capsys.readouterr().out
    release(root / "s" / "records.lmdb")  # this process holds a read-only handle (lmdb opens an env once)
    env = lmdb.open(str(root / "s" / "records.lmdb"), subdir=True)
    with env.begin(write=True) as txn:
        key, value = next(iter(txn.cursor()))
        damaged = bytearray(value)
        damaged[-1] ^= 0x01
        txn.put(key, bytes(damaged))
    env.close()
    assert main(["store", "verify", str(root / "s")]) == 1
    out = capsys.readouterr().out
    assert "1 problem(s)" in out and f"{key.decode()}" in out and "checksum mismatch" in out


def test_int8_values_shrink_the_store(setup, capsys):
    from detkd.store.format import parse_key
    from detkd.store.reader import StoreReader
    from detkd.store.verify import store_info

    root, data = setup
    for name, dtype in (("f16", "float16"), ("i8", "int8")):
        assert store_build(root, data, name, "--channel-group", "1", "--value-dtype", dtype) == 0
        assert f"values {dtype}" in capsys.readouterr().out
        assert main(["store", "verify", str(root / name)]) == 0
    f16, i8 = store_info(root / "f16"), store_info(root / "i8")
    assert f16["records"] == i8["records"] == 12
    reader = StoreReader(root / "i8")
    cells = sum(rec.num_cells for key in reader.keys() for rec in reader.read(*parse_key(key)).values())
    # Same cells: int8 saves one byte per value (16 channels), spends two per cell on its scale and
    # one array header per level and record (length, "pN/q", dtype, ndim, one dim: 8 bytes).
    assert f16["record_bytes"] - i8["record_bytes"] == cells * (16 - 2) - 12 * 5 * 8


def test_sharded_build_then_merge(setup, capsys):
    root, data = setup
    for shard in ("0", "1"):
        assert store_build(root, data, "sh", "--shard", shard, "--num-shards", "2", "--views", "noflip") == 0
        assert "detkd store merge" in capsys.readouterr().out
    assert main(["store", "merge", str(root / "sh")]) == 0
    assert "merged" in capsys.readouterr().out and main(["store", "verify", str(root / "sh")]) == 0
    assert main(["store", "info", str(root / "sh")]) == 0
    out = capsys.readouterr().out
    assert "6 images, 6 image-views" in out and "build: 6 image-views in" in out and "by 2 shards" in out


def test_bad_arguments_are_reported_without_traceback(setup, capsys):
    root, data = setup
    assert store_build(root, data, "x", "--per-level", "p6") == 2
    assert "--per-level: 'p6' is not LEVEL=VALUE" in capsys.readouterr().err
    assert store_build(root, data, "x", "--importance") == 2
    assert "needs a whole-map policy (--policy lowrank, or dense) and --channel-group 1" in capsys.readouterr().err
    assert store_build(root, data, "x", "--shard", "1") == 2
    assert "--shard and --num-shards go together" in capsys.readouterr().err
    assert main(["store", "info", str(root / "nowhere")]) == 2
    assert "not a detkd store" in capsys.readouterr().err


def test_build_defaults_to_the_teachers_training_size(setup, capsys):
    """Without --size the views are at the size(s) the teacher's recipe trained at (a store at another
    size would be refused by every run of that recipe)."""
    from detkd.models.checkpoint import read_checkpoint
    from detkd.store.manifest import Manifest

    root, data = setup
    payload = read_checkpoint(root / "t.pt")
    teacher = build_detector(DetectorSpec(**payload["spec"]))
    save_checkpoint(
        root / "t48.pt",
        teacher,
        class_names=payload["class_names"],
        extra={"run": {"recipe": {"data": {"sizes": [48]}}}},
    )
    args = ["store", "build", "--teacher", str(root / "t48.pt"), "--data", str(data), "--teacher-ap", "0.4"]
    assert main([*args, "--workers", "0", "--no-progress", "--out", str(root / "s48")]) == 0
    assert "views at the teacher's training size(s) [48]" in capsys.readouterr().out
    assert Manifest.load(root / "s48").preprocessing["sizes"] == [48]
    assert (
        main([*args[:3], str(root / "t.pt"), *args[4:], "--workers", "0", "--no-progress", "--out", str(root / "s0")])
        == 0
    )
    assert "records no training size: views at 128 px" in capsys.readouterr().out


def test_an_int2_store_with_level_ranks_from_the_command_line(setup, capsys):
    from detkd.store.reader import StoreReader

    root, data = setup
    args = ("--policy", "lowrank", "--rank", "2", "--level-rank", "p4=5,p5=3", "--value-dtype", "int2")
    assert store_build(root, data, "i2", *args, "--fit-views", "4") == 0
    out = capsys.readouterr().out
    assert "values int2" in out and "encoding lowrank v3 rank 2" in out and "level ranks {'p4': 5, 'p5': 3}" in out
    assert {lv: b.rank for lv, b in StoreReader(root / "i2").bases.items()} == {
        "p3": 2, "p4": 5, "p5": 3, "p6": 2, "p7": 2
    }  # fmt: skip
    assert main(["store", "verify", str(root / "i2")]) == 0
    assert store_build(root, data, "bad", "--value-dtype", "int2") == 2  # nms-ksd cells need a scale per cell
    assert "only lowrank coefficient maps" in capsys.readouterr().err


def test_a_store_fitted_to_a_byte_budget_from_the_command_line(setup, capsys):
    from detkd.store.verify import store_info

    root, data = setup
    assert store_build(root, data, "b", "--policy", "lowrank", "--budget-kb", "8", "--fit-views", "4") == 0
    out = capsys.readouterr().out
    info = store_info(root / "b")
    ranks = info["policy"]["level_rank"]
    assert f"level ranks {ranks}  chosen for 8 KB" in out and set(ranks) == {"p3", "p4", "p5", "p6", "p7"}
    assert info["policy"]["value_dtype"] in ("int2", "int4") and info["projected_coco"]["bytes_per_view"] <= 8 * 1024
    assert store_build(root, data, "x", "--policy", "lowrank", "--budget-kb", "8", "--rank", "4") == 2
    assert "--budget-kb chooses the ranks itself" in capsys.readouterr().err
    assert store_build(root, data, "x", "--policy", "lowrank", "--budget-kb", "0.5") == 2
    assert "cannot hold even the smallest lowrank layout" in capsys.readouterr().err


def test_store_plan_prints_a_layout_per_budget(setup, capsys):
    root, data = setup
    args = ["store", "plan", "--teacher", str(root / "t.pt"), "--data", str(data), "--size", "64", "--fit-views", "4"]
    assert main([*args, "--budget-kb", "0.5", "8"]) == 0
    out = capsys.readouterr().out
    assert "| 0.5 KB | too small |" in out and "| 8 KB | int" in out and "0.5 KB: a budget of 0.5 KB" in out
    assert "spectra of 4 image-views" in out


def test_a_store_of_one_level_from_the_command_line(setup, capsys):
    from detkd.store.verify import store_info

    root, data = setup
    assert store_build(root, data, "p3", "--policy", "lowrank", "--budget-kb", "8", "--levels", "p3") == 0
    out = capsys.readouterr().out
    info = store_info(root / "p3")
    assert list(info["levels"]) == ["p3"] and set(info["policy"]["level_rank"]) == {"p3"}
    assert "only levels ['p3']" in out and "levels p3 (stride 8" in out
    assert store_build(root, data, "x", "--levels", "p9") == 2
    assert "names level(s) ['p9']" in capsys.readouterr().err
    args = ["store", "plan", "--teacher", str(root / "t.pt"), "--data", str(data), "--size", "64", "--fit-views", "4"]
    assert main([*args, "--budget-kb", "8", "--levels", "p3"]) == 0
    assert "| 8 KB | int" in capsys.readouterr().out
    assert main([*args, "--levels", "p9"]) == 2
    assert "levels ['p9']: the teacher's levels are" in capsys.readouterr().err
