"""One batch's stored records -> TeacherKnowledge, the form every method reads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from detkd.knowledge import ChannelBasis, SparseCells, TeacherKnowledge
from detkd.store.format import LevelRecord, StoreError

# Keys of a dense level record's extra arrays written by ``store build --importance`` (on-disk names).
IMPORTANCE_SPATIAL = "gi"  # GKD spatial importance [1, h, w], float16
IMPORTANCE_CHANNEL = "gc"  # GKD channel weights [C], float32


def collate_knowledge(
    records: Sequence[dict[str, LevelRecord] | None],
    *,
    feature_shapes: dict[str, tuple[int, int]],
    channel_group: int,
    device: torch.device | str | None = None,
    bases: dict[str, ChannelBasis] | None = None,
    coefficients: bool = False,
) -> TeacherKnowledge:
    """Per-sample records of one batch (sample i = batch index i) -> TeacherKnowledge.

    Sparse levels become SparseCells (int64 yx, float32 values and score, batch_index concatenated
    in sample order). Dense levels become float32 [B, C', H, W] with each stored valid region placed
    top-left, zeros elsewhere (mask the padding with ``valid_cell_mask``). Coefficient maps (lowrank)
    are reconstructed on the level's ``bases`` entry first, or with ``coefficients`` served as they are
    (padding: the coefficients of a zero map, so both forms describe the same canvas); the bases travel
    with the knowledge so methods can project the student alike. A None record or a missing level
    contributes no cells; a dense level needs a record for every sample.
    """
    levels = list(dict.fromkeys([lv for r in records if r for lv in r]))
    served_coefficients: set[str] = set()
    cells: dict[str, SparseCells] = {}
    dense: dict[str, torch.Tensor] = {}
    for level in levels:
        present = [(i, r[level]) for i, r in enumerate(records) if r and level in r]
        kinds = {rec.is_dense for _, rec in present}
        if len(kinds) > 1:
            raise StoreError(f"level {level!r} is dense in some records and sparse in others")
        if kinds == {True}:
            if len(present) != len(records):
                raise StoreError(f"level {level!r} is dense but {len(records) - len(present)} sample(s) lack it")
            if level not in feature_shapes:
                raise StoreError(f"level {level!r}: no feature shape given to place its dense maps on")
            h, w = feature_shapes[level]
            basis = None
            if all(rec.coefficients is not None for _, rec in present):
                basis = _basis(level, present[0][1], bases)
                maps = [(i, rec.coefficients) for i, rec in present]
                fill = torch.zeros(basis.rank)
                if coefficients:  # served as they are; padding: a zero map's coefficients
                    fill = basis.coefficients(torch.zeros(1, basis.basis.shape[0]), dim=1)[0]
                    served_coefficients.add(level)
                out = fill[None, :, None, None].expand(len(records), -1, h, w).contiguous()
            else:
                maps = [(i, _whole_map(level, rec, bases)) for i, rec in present]
                out = torch.zeros((len(records), maps[0][1].shape[0], h, w), dtype=torch.float32)
            c = out.shape[1]
            reconstruct = basis is not None and not coefficients  # once for the batch, padding zeroed
            valid = torch.zeros(len(records), 1, h, w) if reconstruct else None
            for i, d in maps:
                if d.shape[0] != c or d.shape[1] > h or d.shape[2] > w:
                    raise StoreError(
                        f"level {level!r}: stored map {tuple(d.shape)} does not fit the batch's "
                        f"{c} x {h} x {w} feature canvas"
                    )
                out[i, :, : d.shape[1], : d.shape[2]] = d.float()
                if valid is not None:
                    valid[i, :, : d.shape[1], : d.shape[2]] = 1.0
            if valid is not None:
                out = basis.reconstruct(out, dim=1) * valid
            dense[level] = out
            continue
        counts = [rec.num_cells for _, rec in present]
        width = present[0][1].values.shape[1] if present else 0
        with_score = all(rec.score is not None for _, rec in present)
        cells[level] = SparseCells(
            batch_index=torch.repeat_interleave(
                torch.tensor([i for i, _ in present], dtype=torch.int64), torch.tensor(counts, dtype=torch.int64)
            ),
            yx=torch.cat([rec.yx.long() for _, rec in present]) if present else torch.zeros((0, 2), dtype=torch.int64),
            values=torch.cat([rec.values.float() for _, rec in present]) if present else torch.zeros((0, width)),
            score=torch.cat([rec.score.float() for _, rec in present]) if present and with_score else None,
        )
    used = {lv: b for lv, b in (bases or {}).items() if lv in dense} or None
    if served_coefficients and served_coefficients != set(used or ()):
        raise StoreError(f"levels {sorted(set(used or ()) - served_coefficients)} hold maps, others coefficients")
    knowledge = TeacherKnowledge(
        features=dense or None,
        cells=cells or None,
        channel_group=channel_group,
        bases=used,
        coefficients=bool(served_coefficients),
    )
    if device is not None:
        knowledge = _to_device(knowledge, device)
    return knowledge


def _to_device(k: TeacherKnowledge, device: torch.device | str) -> TeacherKnowledge:
    features = {lv: t.to(device, non_blocking=True) for lv, t in k.features.items()} if k.features else None
    cells = None
    if k.cells:
        cells = {
            lv: SparseCells(
                batch_index=c.batch_index.to(device, non_blocking=True),
                yx=c.yx.to(device, non_blocking=True),
                values=c.values.to(device, non_blocking=True),
                score=None if c.score is None else c.score.to(device, non_blocking=True),
            )
            for lv, c in k.cells.items()
        }
    bases = {lv: b.to(device) for lv, b in k.bases.items()} if k.bases else None
    return TeacherKnowledge(
        features=features, cells=cells, channel_group=k.channel_group, bases=bases, coefficients=k.coefficients
    )


def _whole_map(level: str, rec: LevelRecord, bases: dict[str, ChannelBasis] | None) -> torch.Tensor:
    """A dense record's valid map [C', h, w]: as stored, or reconstructed from its coefficients."""
    if rec.coefficients is None:
        return rec.dense
    return _basis(level, rec, bases).reconstruct(rec.coefficients.float(), dim=0)


def _basis(level: str, rec: LevelRecord, bases: dict[str, ChannelBasis] | None) -> ChannelBasis:
    """The basis a coefficient record is decoded on, checked against the record's rank."""
    basis = (bases or {}).get(level)
    if basis is None:
        raise StoreError(f"level {level!r} holds low-rank coefficients but no basis was given to decode them")
    if rec.coefficients.shape[0] != basis.rank:
        rank = rec.coefficients.shape[0]
        raise StoreError(f"level {level!r}: {rank} coefficients per cell but a basis of rank {basis.rank}")
    return basis


def collate_importance(
    records: Sequence[dict[str, LevelRecord]], sizes: dict[str, tuple[int, int]], device: torch.device | str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """GKD maps kept by a store built with --importance: (spatial {level: [B, 1, H, W]}, channel {level: [B, C]})."""
    spatial, channel = {}, {}
    for lvl, (h, w) in sizes.items():
        recs = [r[lvl] for r in records]
        if any(IMPORTANCE_SPATIAL not in r.extras for r in recs):
            raise StoreError(f"store records lack importance maps for level {lvl}: build with --importance")
        out = torch.zeros(len(recs), 1, h, w, device=device)
        for i, r in enumerate(recs):
            gi = r.extras[IMPORTANCE_SPATIAL].float()
            out[i, :, : gi.shape[-2], : gi.shape[-1]] = gi.to(device)
        spatial[lvl] = out
        channel[lvl] = torch.stack([r.extras[IMPORTANCE_CHANNEL].float() for r in recs]).to(device)
    return spatial, channel
