"""How a record's levels are laid out as named arrays on disk, and back: cell indices and value dtypes.

A ``LevelRecord`` always holds cells as (y, x) and features as float16. On disk a level holds::

    j  flat cell index y * W + x on the level's canvas map (W from the manifest's feature shapes),
       in the smallest integer dtype that holds H * W (uint8 up to 256 cells, so 1 byte per cell
       instead of 4 for int16 (y, x) at the small maps where a record is a few hundred bytes)
    i  cell (y, x) int16 [K, 2]: what stores written before the flat index hold; still read
    v  values [K, C'] and d  dense map [C', h, w]: float16; int8; or int4 as uint8 holding two
       channels (2c in the low nibble, 2c + 1 in the high one, each stored + 8), so [K, C'/2]
    q  the float16 scale of each int8 / int4 vector (one per cell: [K] for v, [h, w] for d);
       value = integer x q
    c  low-rank coefficient maps [r, h, w] (``lowrank`` selector), in the value dtype; integer
       coefficients have one scale per component instead of per cell (r bytes per cell at int8,
       r / 2 at int4, not r + 2): ``k`` float16 [r], value = integer x k. int2 (lowrank only): four
       cells per uint8 along x (cell 4j + i in bits 2i, 2i + 1, each code = q + 2, q in {-2, -1, 0, 1}),
       so [r, h, ceil(w / 4)] (r / 4 bytes per cell); ``m`` float16 [r] the step of each component,
       value = (q + 1/2) x m; such levels always carry ``u``, since a packed width does not say w
    u  int16 [vh, vw, k]: the full valid size of a pooled (or int2) coefficient map and its pooling k
    s  score float16 [K]; any longer name is an extra array, stored as given

Integer values are symmetric per cell vector: scale = max |x| / 127 (int8) or / 7 (int4), so a
cell's rounding error is at most half a step: 1/254 (int8) or 1/14 (int4) of its largest channel.
int2 coefficients are midrise with step = 0.9957 x the component's root mean square over the view
(the uniform 4-level quantiser of least squared error for a Gaussian, Max 1960: error 0.119 of its
variance): error at most step / 2 within [-2, 2) steps, and |x| - 1.5 steps beyond (clipped). At
equal bytes int2 keeps twice int4's components; on the shapes teacher's rank-16 coefficients rank 4
int2 kept 41-52 % of the rank-16 energy against 29-37 % for rank 2 int4 (the bytes of 32 KB per COCO
view).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from detkd.errors import ConfigError
from detkd.store.format import DEFAULT_DTYPES, LevelRecord, StoreError, group_by_level

VALUE_DTYPES = ("float16", "int8", "int4", "int2")
COEFFICIENT_ONLY_DTYPES = ("int2",)  # no per-cell scale: only for lowrank coefficient maps
_QMAX = {"int8": 127, "int4": 7}
_INT2_STEP = 0.9957  # x RMS: Max (1960), the optimal uniform 4-level step for a unit Gaussian


_NUMPY = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32}


def index_dtype(num_cells: int) -> torch.dtype:
    """The smallest stored integer dtype that indexes ``num_cells`` cells."""
    if num_cells <= 256:
        return torch.uint8
    if num_cells <= 2**15:
        return torch.int16
    return torch.int32


def layout_dtypes(value_dtype: str) -> dict[str, str]:
    """What a manifest records of the layout ``encode_levels(..., value_dtype=...)`` writes."""
    if value_dtype == "float16":
        return dict(DEFAULT_DTYPES)
    if value_dtype == "int2":
        return {**DEFAULT_DTYPES, "coefficients": "int2 (four cells per uint8 along x) x float16 step per component"}
    kind = "int8" if value_dtype == "int8" else "int4 (two per uint8)"
    return {**DEFAULT_DTYPES, "values": f"{kind} x float16 scale per cell", "dense": f"{kind} x float16 scale per cell"}


def quantize_symmetric(x: Tensor, *, dim: int, qmax: int = 127) -> tuple[Tensor, Tensor]:
    """Symmetric integers in [-qmax, qmax] along ``dim``: (q int8 like x, scale float16 with ``dim``
    removed), x ~ q * scale."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=dim, keepdim=True) / qmax).half()  # round first: quantise against what is stored
    s32 = scale.float()
    q = torch.where(s32 > 0, torch.round(x32 / s32.clamp(min=torch.finfo(torch.float32).tiny)), 0.0)
    return q.clamp(-qmax, qmax).to(torch.int8), scale.squeeze(dim)


def dequantize(q: Tensor, scale: Tensor, *, dim: int) -> Tensor:
    """Inverse of ``quantize_symmetric`` up to its rounding, as float16."""
    return (q.float() * scale.float().unsqueeze(dim)).half()


def pack_int4(q: Tensor, *, dim: int) -> Tensor:
    """int8 in [-7, 7] -> uint8 with two values per byte along ``dim`` (which must have even length)."""
    if q.shape[dim] % 2:
        raise StoreError(f"int4 values: {q.shape[dim]} channels cannot be packed two per byte; use an even count")
    u = (q.movedim(dim, 0).to(torch.int16) + 8).to(torch.uint8)
    return (u[0::2] | (u[1::2] << 4)).movedim(0, dim).contiguous()


def unpack_int4(packed: Tensor, *, dim: int) -> Tensor:
    """Inverse of ``pack_int4``."""
    p = packed.movedim(dim, 0)
    low, high = (p & 15).view(torch.int8) - 8, (p >> 4).view(torch.int8) - 8  # nibbles < 16: exact in int8
    return torch.stack([low, high], dim=1).reshape(2 * p.shape[0], *p.shape[1:]).movedim(0, dim).contiguous()


def _encode_values(x: Tensor, *, dim: int, value_dtype: str) -> tuple[Tensor, Tensor | None]:
    if value_dtype == "float16":
        return x.half(), None
    q, scale = quantize_symmetric(x, dim=dim, qmax=_QMAX[value_dtype])
    return (pack_int4(q, dim=dim) if value_dtype == "int4" else q), scale


def _decode_values(x: Tensor, scale: Tensor, *, dim: int) -> Tensor:
    if x.dtype == torch.uint8:  # int4, two per byte
        return dequantize(unpack_int4(x, dim=dim), scale, dim=dim)
    if x.dtype == torch.int8:
        return dequantize(x, scale, dim=dim)
    raise StoreError(f"values of dtype {x.dtype} with an integer scale: the record is corrupt")


def _encode_maps(c: Tensor, *, value_dtype: str) -> tuple[Tensor, Tensor | None]:
    """Coefficient maps [r, h, w] -> (stored array, scale [r] or None): one scale per component."""
    if value_dtype == "float16":
        return c.half(), None
    if value_dtype == "int2":
        return encode_int2_maps(c)
    r = c.shape[0]
    q, scale = quantize_symmetric(c.reshape(r, -1), dim=1, qmax=_QMAX[value_dtype])
    q = q.reshape(c.shape)
    return (pack_int4(q, dim=0) if value_dtype == "int4" else q), scale


def _decode_maps(c: Tensor, scale: Tensor) -> Tensor:
    if c.dtype == torch.uint8:
        c = unpack_int4(c, dim=0)
    elif c.dtype != torch.int8:
        raise StoreError(f"coefficients of dtype {c.dtype} with an integer scale: the record is corrupt")
    return (c.float() * scale.float()[:, None, None]).half()


def encode_int2_maps(c: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficient maps [r, h, w] -> (packed uint8 [r, h, ceil(w / 4)], step float16 [r])."""
    c32 = c.float()
    step = (c32.pow(2).mean(dim=(1, 2)).sqrt() * _INT2_STEP).half()  # round first, as quantize_symmetric
    s32 = step.float()[:, None, None]
    q = torch.where(s32 > 0, torch.floor(c32 / s32.clamp(min=torch.finfo(torch.float32).tiny)), 0.0)
    codes = (q.clamp(-2, 1) + 2).to(torch.uint8)
    codes = F.pad(codes, (0, -codes.shape[-1] % 4), value=2)
    packed = codes[..., 0::4] | codes[..., 1::4] << 2 | codes[..., 2::4] << 4 | codes[..., 3::4] << 6
    return packed.contiguous(), step


def decode_int2_maps(packed: Tensor, step: Tensor, width: int) -> Tensor:
    """Inverse of ``encode_int2_maps`` up to its rounding, as float16 [r, h, width]."""
    if packed.dtype != torch.uint8 or packed.dim() != 3 or packed.shape[0] != step.numel():
        raise StoreError(f"int2 coefficients {tuple(packed.shape)} {packed.dtype} do not match {step.numel()} steps")
    if packed.shape[-1] != -(-width // 4):
        raise StoreError(f"int2 coefficients {packed.shape[-1]} bytes wide cannot hold {width} cells; corrupt")
    codes = torch.stack([(packed >> (2 * i)) & 3 for i in range(4)], dim=-1).flatten(-2)[..., :width]
    return ((codes.float() - 1.5) * step.float()[:, None, None]).half()


def _roundtrip_maps(c: Tensor, *, value_dtype: str) -> Tensor:
    if value_dtype == "int2":
        return decode_int2_maps(*encode_int2_maps(c), c.shape[-1])
    return _decode_maps(*_encode_maps(c, value_dtype=value_dtype))


def as_stored(levels: dict[str, LevelRecord], *, value_dtype: str) -> dict[str, LevelRecord]:
    """The records a reader gets back for ``levels`` written with ``value_dtype`` (its rounding)."""
    if value_dtype == "float16":
        return levels
    out = {}
    for level, rec in levels.items():
        values, dense, coefficients = rec.values, rec.dense, rec.coefficients
        if values is not None:
            values = _decode_values(*_encode_values(values, dim=-1, value_dtype=value_dtype), dim=-1)
        if dense is not None:
            dense = _decode_values(*_encode_values(dense, dim=0, value_dtype=value_dtype), dim=0)
        if coefficients is not None:
            coefficients = _roundtrip_maps(coefficients, value_dtype=value_dtype)
        out[level] = LevelRecord(
            yx=rec.yx, values=values, score=rec.score, dense=dense, coefficients=coefficients, extras=dict(rec.extras)
        )
    return out


def _rowwise(arrays: dict[str, tuple[Tensor, ...]], fn) -> list[tuple[str, tuple]]:
    """Apply a row-wise ``fn`` to every level's arrays at once: rows of levels with the same trailing
    shapes and dtypes are concatenated, ``fn`` runs once per such group, its outputs are split back.
    A record holds a few cells per level, so per-level calls were mostly call overhead: on shapes
    records int4 encode took 1.18 ms per record per level-wise, 0.60 ms batched (float16: 0.37 ms)."""
    groups: dict[tuple, list[str]] = {}
    for level, item in arrays.items():
        groups.setdefault(tuple((a.dtype, tuple(a.shape[1:])) for a in item), []).append(level)
    out = []
    for levels in groups.values():
        sizes = [int(arrays[lv][0].shape[0]) for lv in levels]
        results = fn(*(torch.cat(column) for column in zip(*(arrays[lv] for lv in levels), strict=True)))
        split = [r.split(sizes) for r in results]
        out.extend((lv, tuple(part[i] for part in split)) for i, lv in enumerate(levels))
    return out


def encode_levels(
    levels: dict[str, LevelRecord],
    *,
    feature_shapes: dict[str, list[int] | tuple[int, int]],
    value_dtype: str = "float16",
    pool: dict[str, int] | None = None,
) -> dict[str, Tensor]:
    """{level: LevelRecord} -> {"<level>/<part>": array}, the input of ``encode_record``.

    ``pool`` {level: k}: that level's coefficient maps are kept at 1/k resolution (k x k means, edge
    windows over their valid cells only), with their full valid size and k in a part ``u``; decoding
    repeats each kept cell k x k and crops to that size (``decode_levels``)."""
    if value_dtype not in VALUE_DTYPES:
        raise ConfigError(f"value_dtype: unknown {value_dtype!r}; choose one of {VALUE_DTYPES}")
    if value_dtype in COEFFICIENT_ONLY_DTYPES and any(
        rec.values is not None or rec.dense is not None for rec in levels.values()
    ):
        raise ConfigError(f"value_dtype {value_dtype}: only low-rank coefficient maps can be stored so")
    out: dict[str, dict[str, Tensor]] = {}
    for level, rec in levels.items():
        if level not in feature_shapes:
            raise StoreError(f"level {level!r} has no feature shape in the manifest: cannot index its cells")
        if sum(x is not None for x in (rec.values, rec.dense, rec.coefficients)) > 1:
            raise StoreError(f"level {level!r}: a record holds cell values, a dense map or coefficients, not two")
        h, w = (int(v) for v in feature_shapes[level])
        parts = rec.arrays()  # checks the extras' names
        if "i" in parts:  # numpy: a few cells per level, where torch's per-op overhead dominated
            yx = parts.pop("i").numpy().astype(np.int64)
            outside = (yx[:, 0] < 0) | (yx[:, 0] >= h) | (yx[:, 1] < 0) | (yx[:, 1] >= w)
            if outside.any():
                raise StoreError(f"level {level!r}: cell {yx[outside][0].tolist()} lies outside its {h} x {w} map")
            parts["j"] = torch.from_numpy((yx[:, 0] * w + yx[:, 1]).astype(_NUMPY[index_dtype(h * w)]))
        if "d" in parts:
            parts["d"], scale = _encode_values(parts["d"], dim=0, value_dtype=value_dtype)
            if scale is not None:
                parts["q"] = scale
        if "c" in parts:
            k = int((pool or {}).get(level, 1))
            if k > 1 or value_dtype == "int2":
                vh, vw = parts["c"].shape[-2:]
                parts["u"] = torch.tensor([vh, vw, k], dtype=torch.int16)
            if k > 1:
                parts["c"] = F.avg_pool2d(parts["c"].float()[None], k, ceil_mode=True)[0]
            parts["c"], scale = _encode_maps(parts["c"], value_dtype=value_dtype)
            if scale is not None:
                parts["m" if value_dtype == "int2" else "k"] = scale
        out[level] = parts
    cells = {level: (parts["v"],) for level, parts in out.items() if "v" in parts}
    if value_dtype == "float16":
        for level, (values,) in cells.items():
            out[level]["v"] = values.half()
    else:
        for level, (values, scale) in _rowwise(cells, lambda x: _encode_values(x, dim=-1, value_dtype=value_dtype)):
            out[level]["v"], out[level]["q"] = values, scale
    return {f"{level}/{part}": a for level, parts in out.items() for part, a in parts.items()}


def _unpool(level: str, c: Tensor, u: Tensor) -> Tensor:
    """Coefficients kept at 1/k resolution -> the full valid map (each kept cell repeated k x k)."""
    vh, vw, k = (int(v) for v in u.tolist())
    if k < 1 or -(-vh // k) != c.shape[1] or -(-vw // k) != c.shape[2]:
        raise StoreError(f"level {level!r}: pooled map {tuple(c.shape)} does not fit {vh} x {vw} at 1/{k}; corrupt")
    return c.repeat_interleave(k, dim=1).repeat_interleave(k, dim=2)[:, :vh, :vw].contiguous()


def decode_levels(
    arrays: dict[str, Tensor], *, feature_shapes: dict[str, list[int] | tuple[int, int]]
) -> dict[str, LevelRecord]:
    """Inverse of ``encode_levels`` (and reads the (y, x) layout of older stores)."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for level, parts in group_by_level(arrays).items():
        if "j" in parts:
            if level not in feature_shapes:
                raise StoreError(f"level {level!r} has no feature shape in the manifest: cannot place its cells")
            w = int(feature_shapes[level][1])
            j = parts.pop("j").numpy().astype(np.int64)
            parts["i"] = torch.from_numpy(np.stack([j // w, j % w], axis=1).astype(np.int16))
        if "q" in parts and "v" not in parts and "d" not in parts:
            raise StoreError(f"level {level!r}: an integer scale without values; the record is corrupt")
        if "q" in parts and "d" in parts:
            parts["d"] = _decode_values(parts["d"], parts.pop("q"), dim=0)
        if "k" in parts:
            if "c" not in parts:
                raise StoreError(f"level {level!r}: a coefficient scale without coefficients; the record is corrupt")
            parts["c"] = _decode_maps(parts["c"], parts.pop("k"))
        if "m" in parts:
            if "c" not in parts or "u" not in parts:
                raise StoreError(f"level {level!r}: an int2 step without coefficients and their size; corrupt")
            vw, k = int(parts["u"][1]), int(parts["u"][2])
            parts["c"] = decode_int2_maps(parts["c"], parts.pop("m"), -(-vw // max(k, 1)))
        if "u" in parts:
            if "c" not in parts:
                raise StoreError(f"level {level!r}: a pooled size without coefficients; the record is corrupt")
            parts["c"] = _unpool(level, parts["c"], parts.pop("u"))
        grouped[level] = parts
    scaled = {level: (parts["v"], parts.pop("q")) for level, parts in grouped.items() if "q" in parts}
    for level, (values,) in _rowwise(scaled, lambda v, q: (_decode_values(v, q, dim=-1),)):
        grouped[level]["v"] = values
    return {level: LevelRecord.from_arrays(parts) for level, parts in grouped.items()}
