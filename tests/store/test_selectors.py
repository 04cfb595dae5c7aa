"""Selectors are a registry: a toy one registered from this file alone is a usable store policy."""

import pytest
import torch

from detkd.errors import ConfigError
from detkd.store.select import SelectionPolicy
from detkd.store.selectors import SELECTORS, LevelBatch, Selector, cell_records, register_selector

STRIDES = {"p3": 8, "p4": 16}


@pytest.fixture
def corner_selector():
    @register_selector("toy-corner")
    class CornerSelector(Selector):
        """Keeps the top-left cell of every image (a selector needs nothing more than this)."""

        def select(self, batch: LevelBatch, policy: SelectionPolicy):
            picks = [(torch.zeros(1, 2, dtype=torch.int64), torch.ones(1)) for _ in batch.valid]
            return cell_records(batch, picks, policy.channel_group)

    yield "toy-corner"
    SELECTORS.unregister("toy-corner")


def test_a_registered_selector_is_a_policy_with_its_own_records_and_offer(corner_selector):
    g = torch.Generator().manual_seed(0)
    feats = {"p3": torch.randn(2, 8, 4, 4, generator=g), "p4": torch.randn(2, 8, 2, 2, generator=g)}
    policy = SelectionPolicy(name=corner_selector, per_level={"p4": "dense"}, channel_group=2)
    assert policy.value_dtype == "int4"  # the selector's default value dtype
    records = policy.select_batch(feats, image_sizes=[(32, 32), (32, 16)], strides=STRIDES)
    for i, rec in enumerate(records):
        assert rec["p3"].yx.tolist() == [[0, 0]]
        want = feats["p3"][i, :, 0, 0].reshape(4, 2).amax(dim=1)  # channel max over pairs
        torch.testing.assert_close(rec["p3"].values.float(), want.half().float()[None])
        assert rec["p4"].is_dense and rec["p4"].dense.shape == (4, 2, 2 if i == 0 else 1)
    offer = policy.offer(["p3", "p4"], importance=False, describe="the toy store")
    assert offer.sparse_levels == ("p3",) and "toy-corner" in offer.describe


def test_unknown_selectors_are_named_with_the_registered_ones(corner_selector):
    names = "dense, detections, lowrank, nms-ksd, toy-corner"
    with pytest.raises(ConfigError, match=f"unknown 'nope'; choose one of {names}"):
        SelectionPolicy(name="nope")
