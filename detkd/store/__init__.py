"""The knowledge store: teacher features selected once (NMS-KSD), stored compactly, read by students."""

from detkd.store.collate import collate_knowledge
from detkd.store.format import (
    FORMAT_VERSION,
    LevelRecord,
    StoreError,
    decode_record,
    encode_record,
    record_key,
)
from detkd.store.manifest import Manifest, file_sha256, fingerprint
from detkd.store.mirror import mirror_levels
from detkd.store.reader import StoreReader
from detkd.store.select import SelectionPolicy, default_top_k
from detkd.store.selectors import SELECTORS, Selector, register_selector
from detkd.store.verify import VerifyReport, store_info, verify_store
from detkd.store.writer import StoreWriter, merge_shards, shard_indices

__all__ = [
    "FORMAT_VERSION",
    "LevelRecord",
    "Manifest",
    "SELECTORS",
    "Selector",
    "SelectionPolicy",
    "StoreError",
    "StoreReader",
    "StoreWriter",
    "VerifyReport",
    "collate_knowledge",
    "decode_record",
    "default_top_k",
    "encode_record",
    "file_sha256",
    "fingerprint",
    "merge_shards",
    "mirror_levels",
    "record_key",
    "register_selector",
    "shard_indices",
    "store_info",
    "verify_store",
]
