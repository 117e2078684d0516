"""`Mapping`: which rank holds which part of the model (TensorRT-LLM's `Mapping`).

    Mapping(world_size=2, tp_size=2, pp_size=1, rank=0)

A tensor-parallel group of `tp_size` ranks splits every block's projections and the
vocabulary between them; pipeline parallelism (`pp_size` > 1, blocks split between
stages) is not built and is refused here, by name. `check_model(config)` refuses a
model that cannot be split `tp_size` ways before any process starts, and `kv_heads`
says how the KV heads are spread: split when `tp_size` divides them, replicated when
there are fewer KV heads than ranks (each rank then keeps the one KV head its query
heads read, as TensorRT-LLM does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Mapping"]


@dataclass(frozen=True)
class Mapping:
    """Rank `rank` of `world_size` processes: `tp_size` tensor-parallel ranks times `pp_size` stages."""

    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("world_size", "tp_size", "pp_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Mapping.{name} must be an integer >= 1, got {value!r}")
        if self.pp_size != 1:
            raise ValueError(f"Mapping.pp_size={self.pp_size}: pipeline parallelism is not supported; "
                             "use pp_size=1 (tensor parallelism only)")
        if self.world_size != self.tp_size * self.pp_size:
            raise ValueError(f"Mapping.world_size ({self.world_size}) must equal tp_size * pp_size "
                             f"({self.tp_size} * {self.pp_size})")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 0 <= self.rank < self.world_size:
            raise ValueError(f"Mapping.rank must be an integer in [0, {self.world_size}), got {self.rank!r}")

    @classmethod
    def tensor_parallel(cls, tp_size: int, rank: int = 0) -> "Mapping":
        return cls(world_size=tp_size, tp_size=tp_size, pp_size=1, rank=rank)

    def for_rank(self, rank: int) -> "Mapping":
        return Mapping(self.world_size, self.tp_size, self.pp_size, rank)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------ the model
    def check_model(self, config: Any) -> None:
        """Raise ValueError naming the dimension if `config` cannot be split `tp_size` ways."""
        tp = self.tp_size
        if tp == 1:
            return
        if config.num_attention_heads % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide num_attention_heads="
                             f"{config.num_attention_heads} (allowed: a divisor of it)")
        kvh = config.num_key_value_heads
        if kvh % tp and tp % kvh:
            raise ValueError(f"tensor_parallel_size={tp} and num_key_value_heads={kvh}: one must divide the "
                             "other (KV heads are split, or replicated when there are fewer than ranks)")
        if config.intermediate_size % tp:
            raise ValueError(f"tensor_parallel_size={tp} must divide intermediate_size={config.intermediate_size}")

    def heads(self, config: Any) -> range:
        """The query heads this rank computes."""
        n = config.num_attention_heads // self.tp_size
        return range(self.tp_rank * n, (self.tp_rank + 1) * n)

    def kv_heads(self, config: Any) -> range:
        """The KV heads this rank keeps: its share, or the one its query heads read when replicated."""
        kvh, tp = config.num_key_value_heads, self.tp_size
        if kvh >= tp:
            n = kvh // tp
            return range(self.tp_rank * n, (self.tp_rank + 1) * n)
        first = self.tp_rank * kvh // tp  # ranks tp/kvh at a time share (a copy of) one KV head
        return range(first, first + 1)

    def vocab_range(self, vocab_size: int) -> range:
        """The embedding / lm_head rows of this rank; the last rank's may run past the vocabulary
        (padding rows: zeros in the embedding, logits cut off after the gather)."""
        n = -(-vocab_size // self.tp_size)
        return range(self.tp_rank * n, (self.tp_rank + 1) * n)

    def to_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}

    def _repr_html_(self) -> str:
        return (f"<b>Mapping</b> rank {self.rank} of {self.world_size} &middot; tp_size {self.tp_size} "
                f"&middot; pp_size {self.pp_size}")
