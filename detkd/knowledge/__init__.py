"""Teacher knowledge: the contract between whatever produces it and whatever consumes it.

Producers are a live teacher (``knowledge.online``) and the knowledge store (``detkd.store``);
consumers are the distillation methods (``detkd.distill``). Both sides import this package and
nothing of each other, so a new store encoding or a new method touches one side only.
"""

from detkd.knowledge.contract import (
    KNOWLEDGE_KINDS,
    ChannelBasis,
    KnowledgeOffer,
    SparseCells,
    TeacherKnowledge,
    TeacherSource,
    channel_group_max,
    gather_cells,
    level_sizes,
)

__all__ = [
    "KNOWLEDGE_KINDS",
    "ChannelBasis",
    "KnowledgeOffer",
    "SparseCells",
    "TeacherKnowledge",
    "TeacherSource",
    "channel_group_max",
    "gather_cells",
    "level_sizes",
]
