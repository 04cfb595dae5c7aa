"""What a store's records would weigh at another image scale, for planning disk before a build.

The size is not estimated from a formula: a record of the policy's layout at that scale (zeros; every
array's size depends only on its shape and dtype) is encoded by the store's own codec and measured.
The default scale is COCO's: images resized to 1333 x 800, the store's levels, strides and channels.
"""

from __future__ import annotations

import torch

from detkd.store.codec import encode_levels
from detkd.store.collate import IMPORTANCE_CHANNEL, IMPORTANCE_SPATIAL
from detkd.store.format import LevelRecord, encode_record
from detkd.store.manifest import Manifest
from detkd.store.select import SelectionPolicy, valid_cells

COCO_HW = (800, 1333)  # torchvision's detection transform: shorter side 800, longer at most 1333


def projected_record_bytes(manifest: Manifest, image_hw: tuple[int, int] = COCO_HW) -> dict:
    """{"image_hw", "bytes_per_view", "dense_fp16_bytes_per_view", "ratio_to_dense"} at ``image_hw``."""
    policy = SelectionPolicy.from_dict({"value_dtype": "float16", **manifest.policy})
    size, dense = projected_bytes(
        policy,
        strides={lv: int(manifest.strides[lv]) for lv in manifest.levels},
        channels={lv: int(manifest.channels[lv]) for lv in manifest.levels},
        importance=bool(manifest.preprocessing.get("importance")),
        image_hw=image_hw,
    )
    return {
        "image_hw": list(image_hw),
        "bytes_per_view": size,
        "dense_fp16_bytes_per_view": dense,
        "ratio_to_dense": size / dense,
    }


def projected_bytes(
    policy: SelectionPolicy,
    *,
    strides: dict[str, int],
    channels: dict[str, int],
    importance: bool = False,
    image_hw: tuple[int, int] = COCO_HW,
) -> tuple[int, int]:
    """(bytes of one image-view's record under ``policy``, bytes of its dense float16 maps) at
    ``image_hw``, for a teacher with these levels (in order), strides and channels."""
    levels, shapes, dense = {}, {}, 0
    for lv, stride in strides.items():
        h, w = valid_cells(image_hw, stride, (1 << 30, 1 << 30))
        shapes[lv] = (h, w)
        dense += 2 * channels[lv] * h * w
        selector = policy.selector_for(lv)
        extras = {}
        if importance:
            extras = {IMPORTANCE_SPATIAL: torch.zeros(1, h, w).half(), IMPORTANCE_CHANNEL: torch.zeros(channels[lv])}
        if selector.needs_basis:
            levels[lv] = LevelRecord(coefficients=torch.zeros(policy.rank_for(lv), h, w).half(), extras=extras)
        elif selector.serves_maps:
            levels[lv] = LevelRecord(
                dense=torch.zeros(channels[lv] // policy.channel_group, h, w).half(), extras=extras
            )
        else:
            k = min(policy.top_k_for(lv, stride, (h, w)), h * w)
            levels[lv] = LevelRecord(
                yx=torch.zeros(k, 2, dtype=torch.int16),
                values=torch.zeros(k, channels[lv] // policy.channel_group).half(),
                score=torch.zeros(k).half(),
            )
    arrays = encode_levels(levels, feature_shapes=shapes, value_dtype=policy.value_dtype, pool=policy.pool)
    return len(encode_record(arrays)), dense
