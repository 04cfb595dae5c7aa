"""Per-level principal bases of the teacher's features, for the ``lowrank`` store encoding.

Fitted once per store, before its records are built, on the teacher's features of the first
``fit_views`` image views (valid cells only): the mean and the top ``rank`` eigenvectors of the
channel covariance, accumulated in float64, and the share of the sample's variance they keep (what a
method comparing stored maps sees of the teacher; ``detkd store info`` reports it). Saved beside the
manifest as ``bases.pt`` (plain tensors, read back with ``weights_only``) and named by its sha256 in the
manifest's ``encoding``, so every build process, rank and loader worker encodes and decodes with the same
basis.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from detkd.knowledge import ChannelBasis
from detkd.store.format import StoreError, os_error

BASES = "bases.pt"
# Of the lowrank layout. 1: coefficients [r, h, w] ("c") and one scale per component ("k");
# 2: also levels pooled k x k, with their full valid size and k in "u" (written only when a level is pooled);
# 3: also int2 coefficients, packed four cells per byte with a step per component in "m" (and "u" always).
ENCODING_VERSION = 3


class BasisFit:
    """Running first and second moments of one level's channel vectors (float64)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.total = torch.zeros(channels, dtype=torch.float64)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64)

    def add(self, vectors: Tensor) -> None:
        """Cells' channel vectors [K, C]."""
        x = vectors.detach().to("cpu", torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x

    def _eigh(self) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, eigenvalues ascending and clamped at 0, eigenvectors) of the sample's covariance."""
        if self.count < 2:
            raise StoreError("fitting a low-rank basis needs at least two feature cells")
        mean = self.total / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh((cov + cov.T) / 2)
        return mean, values.clamp(min=0), vectors

    def spectrum(self) -> Tensor:
        """The covariance's eigenvalues, largest first (float64 [C]): what each further rank would keep."""
        return self._eigh()[1].flip(0)

    def basis(self, rank: int) -> ChannelBasis:
        c = self.total.shape[0]
        if not 1 <= rank <= c:
            raise StoreError(f"rank {rank} must lie between 1 and the level's {c} channels")
        mean, values, vectors = self._eigh()
        kept = float(values[-rank:].sum() / values.sum()) if values.sum() > 0 else 1.0
        top = vectors[:, -rank:].flip(1)
        # eigh's signs are arbitrary: fix each column's largest entry positive, so refits agree.
        pivot = top.abs().argmax(0)
        top = top * torch.sign(top[pivot, torch.arange(rank)])
        return ChannelBasis(mean=mean.float(), basis=top.float().contiguous(), kept=kept)


def fit_moments(
    batches: Iterable[tuple[dict[str, Tensor], dict[str, list[tuple[int, int]]]]], *, levels: list[str]
) -> dict[str, BasisFit]:
    """The channel moments of ``levels`` over teacher feature batches ({level: [N, C, H, W]}, valid
    (rows, cols) per image per level given as ``valid[level][i]``)."""
    fits: dict[str, BasisFit] = {}
    for features, valid in batches:
        for level in levels:
            f = features[level]
            fit = fits.setdefault(level, BasisFit(f.shape[1]))
            for i, (vh, vw) in enumerate(valid[level]):
                fit.add(f[i, :, :vh, :vw].flatten(1).T)
    missing = [lv for lv in levels if lv not in fits]
    if missing:
        raise StoreError(f"no teacher features to fit a basis on for level(s) {missing}")
    return fits


def fit_bases(
    batches: Iterable[tuple[dict[str, Tensor], dict[str, list[tuple[int, int]]]]],
    *,
    rank: int | dict[str, int],
    levels: list[str],
) -> dict[str, ChannelBasis]:
    """Bases of ``levels`` (``fit_moments``) of ``rank``: one for all levels, or {level: rank}."""
    fits = fit_moments(batches, levels=levels)
    return {lv: fits[lv].basis(rank[lv] if isinstance(rank, dict) else rank) for lv in levels}


def bases_bytes(bases: dict[str, ChannelBasis], spectra: dict[str, Tensor] | None = None) -> bytes:
    """``bases.pt``'s bytes; ``spectra`` {level: eigenvalues} (of a store fitted to a byte budget) are kept
    beside them, so a resumed or sharded build chooses the same ranks again without refitting."""
    buffer = io.BytesIO()
    entries = {}
    for lv, b in sorted(bases.items()):
        entries[lv] = {"mean": b.mean.cpu(), "basis": b.basis.cpu()}
        if b.kept is not None:  # bases files before it was recorded have no "kept"
            entries[lv]["kept"] = torch.tensor(b.kept, dtype=torch.float64)
        if spectra is not None:
            entries[lv]["spectrum"] = spectra[lv].to("cpu", torch.float64)
    torch.save(entries, buffer)
    return buffer.getvalue()


def save_bases(store_dir: str | Path, bases: dict[str, ChannelBasis], spectra: dict[str, Tensor] | None = None) -> bool:
    """Write ``bases.pt`` atomically unless it exists (first writer wins: shard builds fitting at the
    same time all adopt one file). True if this call wrote it."""
    path = Path(store_dir) / BASES
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(bases_bytes(bases, spectra))
        os.link(tmp, path)  # fails if it exists, unlike os.replace
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise os_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def bases_sha256(store_dir: str | Path) -> str:
    return hashlib.sha256((Path(store_dir) / BASES).read_bytes()).hexdigest()


def _read_entries(store_dir: str | Path, sha256: str | None) -> tuple[Path, dict]:
    path = Path(store_dir) / BASES
    if not path.is_file():
        raise StoreError(f"{path}: missing; the store's lowrank encoding cannot be decoded without its bases")
    blob = path.read_bytes()
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise StoreError(f"{path}: its sha256 does not match the manifest's; the bases file was changed or damaged")
    try:
        raw = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or not all(
            isinstance(d, dict) and "mean" in d and "basis" in d for d in raw.values()
        ):
            raise TypeError("expected {level: {mean, basis, ...}}")
    except Exception as exc:  # unpickling refuses anything but tensors and containers
        raise StoreError(f"{path}: not a bases file ({type(exc).__name__}: {exc})") from None
    return path, raw


def load_bases(store_dir: str | Path, *, sha256: str | None = None) -> dict[str, ChannelBasis]:
    """Read ``bases.pt`` (tensors only), checked against the manifest's ``sha256`` when given."""
    path, raw = _read_entries(store_dir, sha256)
    out = {
        lv: ChannelBasis(
            mean=d["mean"].float(), basis=d["basis"].float(), kept=float(d["kept"]) if "kept" in d else None
        )
        for lv, d in raw.items()
    }
    for lv, b in out.items():
        if b.mean.dim() != 1 or b.basis.dim() != 2 or b.basis.shape[0] != b.mean.shape[0]:
            raise StoreError(f"{path}: level {lv!r} has mean {tuple(b.mean.shape)} and basis {tuple(b.basis.shape)}")
    return out


def load_spectra(store_dir: str | Path, *, sha256: str | None = None) -> dict[str, Tensor] | None:
    """The eigenvalue spectra ``bases.pt`` keeps per level (stores fitted to a byte budget), else None."""
    path, raw = _read_entries(store_dir, sha256)
    if not all("spectrum" in d for d in raw.values()):
        return None
    out = {lv: d["spectrum"].to(torch.float64) for lv, d in raw.items()}
    for lv, s in out.items():
        if s.shape != raw[lv]["mean"].shape:
            raise StoreError(
                f"{path}: level {lv!r} has a spectrum {tuple(s.shape)} for {raw[lv]['mean'].numel()} channels"
            )
    return out


def encoding_entry(*, rank: int, fit_views: int, sha256: str, pooled: bool = False, int2: bool = False) -> dict:
    """What the manifest records of a lowrank encoding (part of the store's identity). The version is the
    oldest layout that reads it, so stores that use nothing newer stay readable by older detkd."""
    return {
        "name": "lowrank",
        "version": 3 if int2 else 2 if pooled else 1,
        "rank": int(rank),
        "fit_views": int(fit_views),
        "bases": BASES,
        "sha256": sha256,
    }
