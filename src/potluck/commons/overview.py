"""The whole picture of a commons: `status` (what `potluck commons status` shows), rejections, the leaderboard.

    registry.status()        # bases, tasks, recent contributions, rejections, jobs, leaderboard
    registry.rejections()    # {"count": …, "recent": [… newest rejected contributions with their reasons]}

Nothing that arrives is lost from sight: every rejection is counted and listed apart from the accepted
contributions, each task says whether anything was accepted for it, and accepted weights say what became
of them (`use_of`).
"""

from __future__ import annotations

from sqlalchemy import func, select

from potluck.commons.models import Contribution, Job, Task, view


def use_of(c: Contribution, bases: dict[int, str], current: int | None) -> str | None:
    """What became of accepted weights: "used" by a promoted round, held "in round" by a candidate being
    judged, "available" to the next round, or "stale" (on a base that is not the current one: no round
    fuses it). A rejected round gives its contributions back, so they read "available" again."""
    if c.kind != "weights" or c.status != "accepted":
        return None
    held_by = bases.get(c.fused_into) if c.fused_into is not None else None
    if held_by == "promoted":
        return "used"
    if held_by == "candidate":
        return "in round"
    return "available" if c.base_version == current else "stale"


class OverviewMixin:
    """Read-only summaries, methods of `Registry` (which provides `transaction()`, `_names()`, `bases()`, `tasks()`
    and `contributions()`)."""

    def leaderboard(self) -> list[dict]:
        """Per contributor: accepted weights, datasets, jobs done (compute lent) and examples."""
        board: dict[int, dict] = {}
        with self.transaction() as s:
            names = self._names(s)
            for c in s.scalars(select(Contribution).where(Contribution.status == "accepted")):
                row = board.setdefault(c.contributor, {"contributor": names.get(c.contributor), "weights": 0,
                                                       "datasets": 0, "jobs_done": 0, "examples": 0})
                row["datasets" if c.kind == "dataset" else "weights"] += 1
                row["jobs_done"] += c.job is not None
                row["examples"] += c.n_examples if c.kind == "dataset" or c.job is None else 0
        return sorted(board.values(), key=lambda r: (-(r["weights"] + r["datasets"]), -r["examples"],
                                                     r["contributor"] or ""))

    def status(self, recent: int = 50) -> dict:
        """Bases, tasks, recent contributions and rejections, jobs and the leaderboard, for `potluck commons status`."""
        with self.transaction() as s:
            names = self._names(s)
            job_counts = dict(s.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all())
            task_names = dict(s.execute(select(Task.id, Task.name)).all())
            open_jobs = [view(j, leased_by_name=names.get(j.leased_by), task_name=task_names.get(j.task)) for j in s.scalars(
                select(Job).where(Job.status.in_(("queued", "leased"))).order_by(Job.id).limit(recent))]
        bases = [view(b) for b in self.bases()]
        for b in bases:
            b.pop("spec", None)
        return {"bases": bases, "tasks": self.tasks(), "contributions": self.contributions(limit=recent),
                "rejections": self.rejections(recent),
                "jobs": {"counts": job_counts, "open": open_jobs}, "leaderboard": self.leaderboard()}

    def rejections(self, recent: int = 50) -> dict:
        """How many contributions were rejected, and the newest `recent` with their reasons: never crowded
        out of `status` by accepted ones."""
        with self.transaction() as s:
            count = s.scalar(select(func.count(Contribution.id)).where(Contribution.status == "rejected"))
        return {"count": count, "recent": self.contributions(status="rejected", limit=recent)}
