"""What the photo index returns: the report of an ``add`` and the ranked results of one query."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtop.retrieval.store import Failure


@dataclasses.dataclass
class AddReport:
    """What :meth:`ImageIndex.add` did."""

    #: Id of the segment written, None when nothing was new.
    segment: int | None
    #: Images never indexed before (resolved paths).
    new: list[str]
    #: Images indexed before whose size or modification time changed (re-extracted).
    modified: list[str]
    #: Images already indexed and unchanged (skipped).
    unchanged: int
    #: Images of the segment that could not be read (skipped, not searchable).
    failures: list[Failure]
    #: Whether a half-written segment of a killed run was resumed.
    resumed: bool = False

    @property
    def extracted(self) -> int:
        """Images of the segment that now have a descriptor."""
        return len(self.new) + len(self.modified) - len(self.failures)


@dataclasses.dataclass
class SearchResult:
    """Ranked results of one query: ``paths[i]`` has similarity ``scores[i]``, best first.

    ``error`` says why the query image could not be read (then there are no results).
    """

    query: str
    paths: list[str]
    scores: list[float]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"query", "results": [{"rank", "score", "path"}, …]}`` (and ``"error"`` if unreadable)."""
        out: dict[str, Any] = {
            "query": self.query,
            "results": [
                {"rank": i + 1, "score": float(s), "path": p} for i, (p, s) in enumerate(zip(self.paths, self.scores))
            ],
        }
        if self.error is not None:
            out["error"] = self.error
        return out
