"""Writing and reading stores: round trip, corruption, killed builds, shards, concurrent readers."""

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from detkd.data.views import View
from detkd.store.collate import collate_knowledge
from detkd.store.format import LevelRecord, StoreError, flatten_record, parse_key
from detkd.store.lmdb_env import release
from detkd.store.manifest import Manifest
from detkd.store.mirror import mirror_levels
from detkd.store.reader import StoreReader
from detkd.store.select import SelectionPolicy
from detkd.store.verify import store_info, verify_store
from detkd.store.writer import StoreWriter, merge_shards, shard_indices

STRIDES = {"p3": 8, "p4": 16, "p5": 32}
SHAPES = {"p3": (16, 16), "p4": (8, 8), "p5": (4, 4)}  # a 128 px canvas
CHANNELS = 16
VIEWS = [View(128), View(128, flip=True)]
POLICY = SelectionPolicy(per_level={"p5": "dense"}, top_k={"p3": 6, "p4": 3}, channel_group=4, value_dtype="float16")


def make_manifest(**overrides) -> Manifest:
    fields = dict(
        teacher_hash="t" * 64,
        architecture={"family": "fcos", "fpn_channels": CHANNELS},
        preprocessing={"canvas": 128, "mean": [0.5, 0.5, 0.5]},
        levels=list(STRIDES),
        strides=STRIDES,
        channels={lv: CHANNELS for lv in STRIDES},
        feature_shapes=SHAPES,
        policy=POLICY.to_dict(),
        views=[v.to_dict() for v in VIEWS],
        dataset_fingerprint="f" * 64,
    )
    fields.update(overrides)
    return Manifest(**fields)


def image_id(index: int) -> int:
    return 10 * index + 3


def image_size(index: int) -> tuple[int, int]:
    return 128 - 8 * (index % 5), 128 - 12 * (index % 3)


def teacher_features(index: int, view: View) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2 * index + int(view.flip))
    return {lv: torch.randn(CHANNELS, h, w, generator=g) * 20 for lv, (h, w) in SHAPES.items()}


def make_record(index: int, view: View) -> dict[str, LevelRecord]:
    return POLICY.select_image(teacher_features(index, view), image_size=image_size(index), strides=STRIDES)


def build(out, n: int, *, kill_after: int = -1, shard=None, num_shards: int = 1, commit_every: int = 8) -> None:
    """Deterministic build of n images x 2 views; SIGKILLs itself after ``kill_after`` writes."""
    writer = StoreWriter(
        out, make_manifest(), shard=shard, num_shards=None if shard is None else num_shards, commit_every=commit_every
    )
    written = 0
    for index in shard_indices(n, shard=shard or 0, num_shards=num_shards):
        for view in VIEWS:
            if writer.has(image_id(index), view):
                continue
            writer.write(image_id(index), view, make_record(index, view))
            written += 1
            if written == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    writer.close()


def dump(path) -> dict[str, dict[str, torch.Tensor]]:
    reader = StoreReader(path)
    return {key: flatten_record(reader.read(*parse_key(key))) for key in reader.keys()}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert sorted(a[key]) == sorted(b[key]), key
        for name in a[key]:
            assert a[key][name].dtype == b[key][name].dtype and torch.equal(a[key][name], b[key][name]), (key, name)


def test_round_trip(tmp_path):
    build(tmp_path, 5)
    reader = StoreReader(tmp_path)
    assert reader.manifest.complete and reader.complete
    assert reader.manifest.counts["records"] == 10 and reader.manifest.counts["images"] == 5
    assert len(reader) == 10 and len(list(reader.keys())) == 10
    assert reader.views_for(image_id(2)) == VIEWS and reader.views_for(999) == []
    assert (image_id(2), VIEWS[1]) in reader and "23/s128-flip" in reader and (image_id(7), VIEWS[0]) not in reader
    for index in range(5):
        for view in VIEWS:
            got = reader.read(image_id(index), view)
            feats = teacher_features(index, view)
            for level in ("p3", "p4"):
                yx = got[level].yx.long()
                # Stored values are the fp16 rounding of the channel-pooled fp32 teacher vectors.
                exact = feats[level][:, yx[:, 0], yx[:, 1]].T.reshape(len(yx), 4, 4).amax(dim=2)
                assert torch.equal(got[level].values.float(), exact.half().float())
            assert got["p3"].num_cells == 6
            h, w = image_size(index)
            assert got["p5"].dense.shape == (4, -(-h // 32), -(-w // 32))
    with pytest.raises(StoreError, match=r"no record for image 13 view s64; it holds views \['s128', 's128-flip'\]"):
        reader.read(13, View(64))
    assert reader.policy == POLICY and reader.channel_group == 4


def test_store_info_and_verify(tmp_path):
    build(tmp_path, 3)
    info = store_info(tmp_path)
    dense = sum(2 * CHANNELS * h * w for h, w in SHAPES.values())
    assert info["dense_fp16_bytes_per_view"] == dense
    assert info["records"] == 6 and info["images"] == 3 and info["views"] == ["s128", "s128-flip"]
    assert info["ratio_to_dense"] == pytest.approx(info["record_bytes"] / 6 / dense)
    assert info["teacher_hash"] == "t" * 64 and info["policy"]["channel_group"] == 4
    report = verify_store(tmp_path)
    assert report.ok and report.records == 6 and report.bytes == info["record_bytes"], report.summary()


def test_flipped_byte_is_detected_on_read_and_by_verify(tmp_path):
    build(tmp_path, 3)
    env_path = tmp_path / "records.lmdb"
    release(env_path)
    env = lmdb.open(str(env_path))
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(b"13/s128-flip"))
        value[len(value) // 2] ^= 0x10
        txn.put(b"13/s128-flip", bytes(value))
    env.close()
    reader = StoreReader(tmp_path)
    with pytest.raises(StoreError, match=r"13/s128-flip'.*checksum mismatch"):
        reader.read(13, View(128, flip=True))
    reader.read(13, View(128))  # the others are fine
    report = verify_store(tmp_path)
    assert not report.ok and len(report.errors) == 1 and "13/s128-flip" in report.errors[0]
    assert "1 problem(s)" in report.summary()
    # Without verification the damaged record decodes (to wrong numbers): the reader's choice.
    StoreReader(tmp_path, verify=False).read(13, View(128, flip=True))


def _run_build(out, n, kill_after):
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_writer_reader as t; "
        f"t.build(sys.argv[1], int(sys.argv[2]), kill_after=int(sys.argv[3]))"
    )
    return subprocess.run(
        [sys.executable, "-c", script, str(out), str(n), str(kill_after)], capture_output=True, text=True, timeout=300
    )


def test_killed_build_resumes_to_an_identical_store(tmp_path):
    n = 12
    killed = _run_build(tmp_path / "resumed", n, kill_after=21)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = StoreReader(tmp_path / "resumed")
    assert not partial.complete and len(partial) == 16  # 2 commits of 8; the 5 pending writes are lost
    assert not verify_store(tmp_path / "resumed").ok
    resumed = _run_build(tmp_path / "resumed", n, kill_after=-1)
    assert resumed.returncode == 0, resumed.stderr
    build(tmp_path / "clean", n)
    assert_same(dump(tmp_path / "resumed"), dump(tmp_path / "clean"))
    a, b = Manifest.load(tmp_path / "resumed"), Manifest.load(tmp_path / "clean")
    assert a.identity_diff(b) == [] and a.counts == b.counts and a.complete and b.complete
    assert verify_store(tmp_path / "resumed").ok


def test_reopen_continues_and_refuses_other_manifests(tmp_path):
    with StoreWriter(tmp_path, make_manifest(), commit_every=100) as writer:
        writer.write(3, VIEWS[0], make_record(0, VIEWS[0]))
        assert writer.has(3, VIEWS[0]) and not writer.has(3, VIEWS[1])  # pending counts as present
        assert writer.counts["records"] == 0
    with StoreWriter(tmp_path, make_manifest(created="later", counts={"images": 9, "records": 9, "bytes": 9})) as w:
        assert w.has(3, VIEWS[0]) and w.counts == Manifest.load(tmp_path).counts
        assert w.counts["records"] == 1
        w.write(3, VIEWS[1], make_record(0, VIEWS[1]))
    assert Manifest.load(tmp_path).counts["records"] == 2
    for field, value in [("teacher_hash", "x"), ("preprocessing", {"canvas": 256}), ("dataset_fingerprint", "y")]:
        with pytest.raises(StoreError, match=f"different {field}"):
            StoreWriter(tmp_path, make_manifest(**{field: value}))


def test_writer_misuse_and_failed_builds(tmp_path):
    for shard, num_shards in [(0, None), (None, 2), (2, 2)]:
        with pytest.raises(StoreError, match="sharded build"):
            StoreWriter(tmp_path / "x", make_manifest(), shard=shard, num_shards=num_shards)
    with pytest.raises(RuntimeError), StoreWriter(tmp_path, make_manifest(), commit_every=1) as writer:
        writer.write(3, VIEWS[0], make_record(0, VIEWS[0]))
        with pytest.raises(StoreError, match="view s64 is not among"):
            writer.write(3, View(64), make_record(0, VIEWS[0]))
        with pytest.raises(StoreError, match=r"level\(s\) \['p9'\]"):
            writer.write(3, VIEWS[1], {"p9": LevelRecord(dense=torch.zeros(1, 1, 1).half())})
        raise RuntimeError("teacher crashed")
    assert not StoreReader(tmp_path).complete and len(StoreReader(tmp_path)) == 1
    with pytest.raises(StoreError, match="closed"):
        writer.write(3, VIEWS[1], {})


def test_map_grows_on_demand(tmp_path):
    big = {"p3": LevelRecord(dense=torch.arange(16 * 16 * 16, dtype=torch.float16).reshape(16, 16, 16))}
    with StoreWriter(tmp_path, make_manifest(), commit_every=4, initial_map_size=64 << 10) as writer:
        for i in range(40):  # 40 x 8 KB through a 64 KB map
            writer.write(i, VIEWS[0], big)
    assert (tmp_path / "records.lmdb" / "data.mdb").stat().st_size > 320 << 10
    reader = StoreReader(tmp_path)
    assert len(reader) == 40 and torch.equal(reader.read(39, VIEWS[0])["p3"].dense, big["p3"].dense)
    assert verify_store(tmp_path).ok


def test_sharded_build_and_merge_equal_a_single_build(tmp_path):
    n = 7
    build(tmp_path / "single", n)
    for shard in (0, 1):
        build(tmp_path / "sharded", n, shard=shard, num_shards=2)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [
        "build.lock",  # flock files stay (removing one would race a build opening it)
        "manifest.json",
        "shard-0000.json",
        "shard-0000.lmdb",
        "shard-0000.lock",
        "shard-0001.json",
        "shard-0001.lmdb",
        "shard-0001.lock",
    ]
    single = dump(tmp_path / "single")
    assert StoreReader(tmp_path / "sharded").complete
    assert_same(dump(tmp_path / "sharded"), single)  # readable before merging
    assert verify_store(tmp_path / "sharded").ok
    merged = merge_shards(tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["build.lock", "manifest.json", "records.lmdb"]
    assert_same(dump(tmp_path / "sharded"), single)
    assert merged.counts == Manifest.load(tmp_path / "single").counts and merged.complete
    assert verify_store(tmp_path / "sharded").ok
    assert list(shard_indices(7, shard=1, num_shards=2)) == [1, 3, 5]


def test_merge_refuses_unfinished_shards_and_finishes_interrupted_clean_up(tmp_path):
    with pytest.raises(RuntimeError), StoreWriter(tmp_path, make_manifest(), shard=0, num_shards=2):
        raise RuntimeError
    with pytest.raises(StoreError, match="shard-0001 is missing.*shard-0000 was not finished"):
        merge_shards(tmp_path)
    build(tmp_path, 4, shard=0, num_shards=2)
    assert not StoreReader(tmp_path).complete  # shard 1 never ran
    report = verify_store(tmp_path)
    assert any("shard-0001 is missing" in e for e in report.errors), report.errors
    with pytest.raises(StoreError, match="shard-0001 is missing"):
        merge_shards(tmp_path)
    build(tmp_path, 4, shard=1, num_shards=2)
    expected = dump(tmp_path)
    merge_shards(tmp_path)
    # Simulate a merge killed during clean-up: a shard directory whose status file is already gone.
    (tmp_path / "shard-0001.lmdb").mkdir()
    (tmp_path / "shard-0001.lmdb" / "lock.mdb").write_bytes(b"")
    assert_same(dump(tmp_path), expected)
    merge_shards(tmp_path)
    assert not (tmp_path / "shard-0001.lmdb").exists() and verify_store(tmp_path).ok
    unfinished = StoreWriter(tmp_path / "single", make_manifest())  # a single build, never closed
    with pytest.raises(StoreError, match="another build is writing this store"):
        merge_shards(tmp_path / "single")  # while it runs
    unfinished._release_lock()  # as its process's death would
    with pytest.raises(StoreError, match="no shards to merge and the build is not finished"):
        merge_shards(tmp_path / "single")
    unfinished.close()


class KeyDataset(Dataset):
    def __init__(self, path, keys):
        self.reader = StoreReader(path)
        self.keys = keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.keys[i], flatten_record(self.reader.read(*parse_key(self.keys[i])))


def test_dataloader_workers_read_the_same_data(tmp_path):
    build(tmp_path, 10)
    expected = dump(tmp_path)  # the parent holds an open handle when the workers fork
    dataset = KeyDataset(tmp_path, sorted(expected))
    loader = DataLoader(dataset, batch_size=None, num_workers=2, shuffle=False)
    got = dict(loader)
    assert_same(got, expected)
    # Spawned workers get a pickled reader: it carries no LMDB handle and reopens on first use.
    clone = pickle.loads(pickle.dumps(dataset.reader))
    assert_same({k: flatten_record(clone.read(*parse_key(k))) for k in expected}, expected)


def test_collate_knowledge_places_sparse_and_dense_levels(tmp_path):
    records = [make_record(0, VIEWS[0]), None, make_record(1, VIEWS[1])]
    records[1] = {"p3": records[0]["p3"], "p4": records[0]["p4"], "p5": records[2]["p5"]}
    k = collate_knowledge(records, feature_shapes=SHAPES, channel_group=4)
    cells = k.cells["p3"]
    assert cells.batch_index.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert torch.equal(cells.yx, torch.cat([r["p3"].yx.long() for r in records]))
    assert cells.values.dtype == torch.float32 and torch.equal(
        cells.values, torch.cat([r["p3"].values.float() for r in records])
    )
    assert cells.score.shape == (18,) and k.channel_group == 4
    dense = k.features["p5"]
    assert dense.shape == (3, 4, 4, 4)
    for i, r in enumerate(records):
        d = r["p5"].dense
        assert torch.equal(dense[i, :, : d.shape[1], : d.shape[2]], d.float())
        assert dense[i, :, d.shape[1] :].abs().sum() == 0 and dense[i, :, :, d.shape[2] :].abs().sum() == 0
    sparse_only = collate_knowledge([{"p3": records[0]["p3"]}, None], feature_shapes=SHAPES, channel_group=4)
    assert sparse_only.features is None and sparse_only.cells["p3"].batch_index.tolist() == [0] * 6
    with pytest.raises(StoreError, match="lack it"):
        collate_knowledge([records[0], None], feature_shapes=SHAPES, channel_group=4)
    with pytest.raises(StoreError, match="does not fit"):
        collate_knowledge(records, feature_shapes={**SHAPES, "p5": (2, 2)}, channel_group=4)
    build(tmp_path, 2)
    reader = StoreReader(tmp_path)
    k2 = reader.to_knowledge([reader.read(image_id(0), VIEWS[0])])
    assert torch.equal(k2.cells["p4"].values, records[0]["p4"].values.float())


def test_mirror_levels():
    rec = {
        "p3": LevelRecord(yx=torch.tensor([[1, 0], [2, 5]], dtype=torch.int16), values=torch.zeros(2, 4).half()),
        "p5": LevelRecord(
            dense=torch.arange(6.0).reshape(1, 2, 3).half(),
            extras={"gi": torch.arange(6.0).reshape(1, 2, 3).half(), "gc": torch.tensor([1.0, 2.0, 3.0])},
        ),
    }
    out = mirror_levels(rec, image_size=(40, 44), strides=STRIDES)  # valid width ceil(44 / 8) = 6 cells
    assert out["p3"].yx.tolist() == [[1, 5], [2, 0]]
    assert out["p5"].dense.tolist() == [[[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]]
    # A map of the level's shape (GKD importance) is mirrored with it; per-channel weights are not.
    assert out["p5"].extras["gi"].tolist() == [[[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]]
    assert out["p5"].extras["gc"].tolist() == [1.0, 2.0, 3.0]
    assert rec["p3"].yx.tolist() == [[1, 0], [2, 5]]  # input untouched


def test_value_dtype_defaults_and_older_stores(tmp_path):
    assert SelectionPolicy().value_dtype == "int4" and SelectionPolicy(name="detections").value_dtype == "int4"
    assert SelectionPolicy(name="dense").value_dtype == "float16"
    # A manifest written before value_dtype existed: its values are float16, whatever today's default.
    legacy = {k: v for k, v in POLICY.to_dict().items() if k != "value_dtype"}
    StoreWriter(tmp_path, make_manifest(policy=legacy)).close()
    assert StoreReader(tmp_path).policy.value_dtype == "float16"
