"""Serving a flipped view from its unflipped record (stores built with ``mirror_flips``)."""

from __future__ import annotations

from detkd.store.format import LevelRecord


def mirror_levels(
    record: dict[str, LevelRecord], *, image_size: tuple[int, int], strides: dict[str, int]
) -> dict[str, LevelRecord]:
    """Approximate the flipped view's record from the unflipped one's: x' = ceil(w / s) - 1 - x for
    cells, a horizontal flip for dense maps (their stored width is already the valid width) and for
    a dense level's extras of the map's spatial shape (e.g. GKD importance maps [1, h, w]); other
    extras (per-channel weights, per-cell arrays) are passed through. Conv features are only roughly
    flip-equivariant, so this is an approximation of the flipped view's record."""
    w = int(image_size[1])
    out: dict[str, LevelRecord] = {}
    for level, rec in record.items():
        if rec.is_dense:
            hw = rec.map_hw
            extras = {k: v.flip(-1) if v.dim() == 3 and tuple(v.shape[-2:]) == hw else v for k, v in rec.extras.items()}
            flip = lambda m: None if m is None else m.flip(-1)  # noqa: E731
            out[level] = LevelRecord(dense=flip(rec.dense), coefficients=flip(rec.coefficients), extras=extras)
            continue
        yx = rec.yx.clone() if rec.yx is not None else None
        if yx is not None:
            valid_w = -(-w // int(strides[level]))
            yx[:, 1] = valid_w - 1 - yx[:, 1]
        out[level] = LevelRecord(yx=yx, values=rec.values, score=rec.score, extras=dict(rec.extras))
    return out
