"""FitNet-style hint loss: MSE between adapted student and teacher FPN features.

Also the default loss of NMS-KSD: with a store of sparse cells, the same MSE is taken over
the stored cells only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from detkd.distill.adapters import LevelAdapters, graph_zero, teacher_cells, teacher_feature
from detkd.distill.base import DistillContext, DistillMethod, LevelSpec, register_method
from detkd.knowledge import SparseCells, TeacherKnowledge


@register_method("fitnet")
class FitNet(DistillMethod):
    """FitNet hint loss: MSE between adapted student and teacher features per level (dense or stored cells).

    Loss per level ``l`` (term ``fitnet.<l>``):

    * dense: ``weight * mean_{n,c,i,j} (g(F^S) - F^T)^2`` (mean over all N*C'*H*W elements);
    * sparse cells (stored teacher): ``weight * mean_{k,c} (g(F^S)[k] - v_k)^2`` over the K
      stored cells and their C' channels, or with ``use_cell_score`` the score-weighted mean
      ``sum_k s_k mean_c(...)^2 / sum_k s_k``.

    ``g`` is the per-level adapter followed by the teacher's grouped channel max pooling when
    the store compressed channels (``channel_group`` > 1). Native reduction: mean.

    Args:
        levels: levels to distill.
        weight: loss weight per level. Default 1.0: the common un-normalised MSE hint has no
            reference detection weight (MMRazor's FitNets weight 10 belongs to a different,
            L2-normalised loss); tune per pair.
        adapter: adapter kind, "conv1x1" by default (FitNets/FGFI use 3x3; "auto" = identity
            where channels match).
        adapter_init: adapter initialisation (see ``build_adapter``), PyTorch default.
        use_cell_score: weight stored cells by their saliency score (sparse path only).
    """

    needs = frozenset({"features"})
    sparse_ok = True
    coefficient_ok = True

    def __init__(
        self,
        *,
        levels: dict[str, LevelSpec],
        weight: float = 1.0,
        adapter: str = "conv1x1",
        adapter_init: str = "default",
        use_cell_score: bool = False,
    ) -> None:
        super().__init__(levels=levels)
        self.weight = float(weight)
        self.use_cell_score = bool(use_cell_score)
        self.adapters = LevelAdapters(levels, kind=adapter, init=adapter_init)

    def forward(self, student: dict[str, Tensor], teacher: TeacherKnowledge, ctx: DistillContext) -> dict[str, Tensor]:
        r = teacher.channel_group
        out: dict[str, Tensor] = {}
        for lvl in self.levels:
            if teacher.cells is not None:
                loss = self._sparse(lvl, student[lvl], teacher_cells(teacher, lvl, method=self.name), r)
            else:
                t = teacher_feature(teacher, lvl, method=self.name)
                s = self.adapters.adapt(lvl, student[lvl], teacher).float()
                if teacher.in_coefficients(lvl):  # the mean over N*C'*H*W of the reconstructed maps' width C'
                    width = teacher.full_channels(lvl, s.shape[1])
                    loss = F.mse_loss(s, t, reduction="sum") / (s[:, 0].numel() * width)
                else:
                    loss = F.mse_loss(s, t)
            out[f"fitnet.{lvl}"] = self.weight * loss
        return out

    def _sparse(self, level: str, student: Tensor, cells: SparseCells, group: int) -> Tensor:
        s = self.adapters.adapt_cells(level, student, cells, channel_group=group).float()
        if s.shape[0] == 0:  # no stored cell on this level for this batch
            return graph_zero(s)
        per_cell = (s - cells.values).pow(2).mean(dim=1)  # [K]
        if not self.use_cell_score:
            return per_cell.mean()
        if cells.score is None:
            raise ValueError("fitnet: use_cell_score=True but the store keeps no cell scores")
        score = cells.score
        return (per_cell * score).sum() / score.sum().clamp(min=1e-12)
