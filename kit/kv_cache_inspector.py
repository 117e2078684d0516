"""Read-only views of a `KVCacheManager` for notebooks and widgets: stats, block map, HTML grid."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from kit.kv_cache import KVCacheManager

__all__ = ["KVCacheInspector"]

_COLORS = {"free": "#e5e7eb", "cached": "#93c5fd", "used": "#86efac", "shared": "#16a34a"}
_MAX_GRID_BLOCKS = 4096


class KVCacheInspector:
    """Read-only views of a `KVCacheManager` for notebooks and widgets.

    `block_map()` columns (one row per block, in block id order):
        block_id           int    0 .. num_blocks - 1
        owner_request_ids  tuple  ids of the requests whose block table holds it, () if none
        ref_count          int    len(owner_request_ids)
        hash               str    first 8 hex digits of its prefix hash, or None (not full / no caching)
        state              str    'free' | 'used' | 'cached' (see the module docstring)
        num_tokens         int    token slots it holds (or is being filled with) for its owners:
                                  block_size when full or cached, less for a tail block, 0 when free
    `snapshot(step)` is the same frame with a leading `step` column, to concatenate over a run.
    """

    COLUMNS = ("block_id", "owner_request_ids", "ref_count", "hash", "state", "num_tokens")

    def __init__(self, manager: KVCacheManager) -> None:
        self.manager = manager
        self._num_snapshots = 0

    def stats(self) -> dict[str, Any]:
        """num_blocks, block_size, used / free / cached (block counts, summing to num_blocks),
        usage_pct, hit_rate (hit / queried tokens), num_queried_tokens, num_cached_tokens
        (prompt tokens reused from the cache so far), num_evictions, num_requests, memory_mib
        (None when bytes_per_token is unknown)."""
        m = self.manager
        bpt = m.bytes_per_token
        return {
            "num_blocks": m.num_blocks,
            "block_size": m.block_size,
            "used": m.num_used_blocks,
            "free": len(m._free),
            "cached": m.num_cached_blocks,
            "usage_pct": 100.0 * m.usage,
            "hit_rate": m.hit_rate,
            "num_queried_tokens": m.num_queried_tokens,
            "num_cached_tokens": m.num_hit_tokens,
            "num_evictions": m.num_evictions,
            "num_requests": len(m._tables),
            "memory_mib": None if bpt is None else m.num_blocks * m.block_size * bpt / 2**20,
        }

    def block_map(self) -> pd.DataFrame:
        m, bs = self.manager, self.manager.block_size
        owners: list[list[str]] = [[] for _ in range(m.num_blocks)]
        tokens = [0] * m.num_blocks
        for rid, table in m._tables.items():
            slots = m._num_slots.get(rid, 0)
            for i, b in enumerate(table):
                owners[b].append(rid)
                tokens[b] = max(tokens[b], min(bs, slots - i * bs))
        hashes = [None if h is None else h.hex()[:8] for h in m._block_hash]
        states = ["used" if rc else "free" if h is None else "cached" for rc, h in zip(m._ref_count, hashes)]
        return pd.DataFrame({
            "block_id": range(m.num_blocks),
            "owner_request_ids": pd.Series([tuple(o) for o in owners], dtype=object),
            "ref_count": list(m._ref_count),
            "hash": pd.Series(hashes, dtype=object),  # keep None (pandas would make it NaN)
            "state": pd.Series(states, dtype=object),
            "num_tokens": [bs if st == "cached" else t for st, t in zip(states, tokens)],
        })

    def snapshot(self, step: int | None = None) -> pd.DataFrame:
        """`block_map()` with a leading `step` column (default: 0, 1, 2, ... per call)."""
        if step is None:
            step = self._num_snapshots
        self._num_snapshots += 1
        df = self.block_map()
        df.insert(0, "step", step)
        return df

    def _repr_html_(self) -> str:
        s = self.stats()
        shown = {k: (f"{v:.1f}" if k == "usage_pct" else f"{v:.3f}" if k == "hit_rate" else
                     f"{v:.1f}" if k == "memory_mib" and v is not None else v) for k, v in s.items()}
        stats_html = "<table>" + "".join(
            f"<tr><th style='text-align:left'>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in shown.items()
        ) + "</table>"
        cells = []
        for row in self.block_map().head(_MAX_GRID_BLOCKS).itertuples(index=False):
            color = _COLORS["shared" if row.ref_count > 1 else row.state]
            title = (f"block {row.block_id}: {row.state}, ref {row.ref_count}, {row.num_tokens} tokens, "
                     f"hash {row.hash}, owners {', '.join(row.owner_request_ids) or '-'}")
            cells.append(f"<div title='{html.escape(title, quote=True)}' style='width:10px;height:10px;"
                         f"margin:1px;background:{color}'></div>")
        more = (f"<div>first {_MAX_GRID_BLOCKS} of {self.manager.num_blocks} blocks shown</div>"
                if self.manager.num_blocks > _MAX_GRID_BLOCKS else "")
        legend = " ".join(f"<span style='background:{c};padding:0 6px'>{k}</span>" for k, c in _COLORS.items())
        grid = ("<div style='display:flex;flex-wrap:wrap;max-width:640px'>" + "".join(cells) + "</div>")
        return (f"<div><b>KV cache</b> ({html.escape(repr(self.manager))})"
                f"<div style='display:flex;gap:16px;align-items:flex-start'>{stats_html}"
                f"<div>{grid}{more}<div style='margin-top:4px;font-size:smaller'>{legend}</div></div></div></div>")
