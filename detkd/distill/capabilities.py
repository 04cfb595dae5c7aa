"""Before training: can every method run on what its teacher source offers?

Methods declare what they use (``needs``, ``sparse_ok``); a source describes what it serves
(``KnowledgeOffer``). A mismatch is refused here, naming the method, the levels and the remedy,
instead of failing (or silently doing less) at the first step.
"""

from __future__ import annotations

from collections.abc import Mapping

from detkd.distill.base import DistillMethod
from detkd.errors import ConfigError
from detkd.knowledge import KnowledgeOffer


def check_servable(methods: Mapping[str, DistillMethod], offer: KnowledgeOffer) -> None:
    """Raise ConfigError unless each method can consume ``offer`` on the levels it distills."""
    for name, method in methods.items():
        used = [lv for lv in method.levels if lv in offer.levels]
        sparse = [lv for lv in used if lv in offer.sparse_levels]
        if sparse and not method.sparse_ok:
            raise ConfigError(
                f"method {name!r} needs whole teacher feature maps but {offer.describe} keeps sparse cells on "
                f"levels {sparse}; use a position-wise method (fitnet, pkd), or build a store with --policy lowrank "
                "(or dense), or distill online"
            )
        if "importance" in method.needs and not offer.importance:
            raise ConfigError(
                f"method {name!r} needs the teacher's gradient-importance maps but {offer.describe} was built "
                "without them; build it with --importance --policy lowrank (or dense --channel-group 1), or "
                "distill online"
            )
