"""What a submission may use: the per-token limits (usage windows counted per minute) and the
queue's bound, checked inside the submitting transaction.

Each top-level task adds its scan, addresses, probes and forced rescan to its owner's minute in
`usage_minutes`; a window's usage is the minutes after its first one plus the part of that
first minute inside the window, read from the tasks themselves (see `usage_params`), so counts
are exact and none of it grows with the tasks of a window.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import BindParameter, Connection, bindparam, func, select, tuple_

from config import Limits
from db import DIALECT_INSERTS, Database
from models import TaskStatus, tasks, usage_minutes

# What each limit counts over, in seconds (None: what is queued or running now).
LIMIT_WINDOWS: dict[str, float | None] = {
    "scans_per_minute": 60.0, "concurrent_scans": None, "addresses_per_day": 86_400.0, "rescans_per_hour": 3600.0,
    "probes_per_day": 86_400.0,
}
# The limits that weigh each scan by a column of its task (the others count scans), with what
# a refusal of one scan that alone passes the limit says of it and asks for instead.
WEIGHTS = {"addresses_per_day": ("address_count", "covers {} addresses", "a smaller range"),
           "probes_per_day": ("probe_count", "sends {} probes (addresses x ports)", "fewer addresses or ports")}


class QueueFull(RuntimeError):
    """The queue already holds max_queued_tasks waiting tasks."""


class RateLimited(RuntimeError):
    """A limit of the caller's token would be passed; the message names it and when to retry."""


# ---- the statements, built once (bound parameters are named p_*) --------------------------
_OWNER: BindParameter[str] = bindparam("p_owner")
# The queue's length: queued tasks a worker may claim (a sharded parent is never claimed).
_COUNT_WAITING = select(func.count().label("waiting")).select_from(tasks).where(
    tasks.c.status == TaskStatus.QUEUED.value, tasks.c.shard_count == 0)
# What a token's tasks use of its limits: the windows' usage of its top-level tasks from
# usage_minutes (see `_windowed`), and its nmap processes queued and running: a task, or each
# shard of a sharded one (its parent runs nothing). Counted one status at a time: given
# `status IN (...)`, PostgreSQL read every task of the token.
_TOP_LEVEL_OF_OWNER = (tasks.c.owner == _OWNER) & tasks.c.parent_id.is_(None)


def _nmap_runs_in(status: TaskStatus) -> Any:
    return select(func.count()).where(tasks.c.owner == _OWNER, tasks.c.status == status.value,
                                      tasks.c.shard_count == 0).scalar_subquery()


def _windowed(bucketed: Any, from_tasks: Any, window: str, *counted: Any) -> Any:
    """A window's usage, exactly: the minutes after its first one from usage_minutes, and the
    part of its first minute inside the window from the tasks themselves (see usage_params)."""
    minutes = select(func.coalesce(func.sum(bucketed), 0)).where(
        usage_minutes.c.owner == _OWNER, usage_minutes.c.minute > bindparam(f"p_{window}_first_minute"))
    first_minute = select(from_tasks).where(
        _TOP_LEVEL_OF_OWNER, *counted, tasks.c.created_at > bindparam(f"p_{window}_ago"),
        tasks.c.created_at < bindparam(f"p_{window}_first_minute_end"))
    return minutes.scalar_subquery() + first_minute.scalar_subquery()


USAGE = select(
    _windowed(usage_minutes.c.scans, func.count(), "minute").label("scans_per_minute"),
    (_nmap_runs_in(TaskStatus.QUEUED) + _nmap_runs_in(TaskStatus.RUNNING)).label("concurrent_scans"),
    _windowed(usage_minutes.c.addresses, func.coalesce(func.sum(tasks.c.address_count), 0), "day")
    .label("addresses_per_day"),
    _windowed(usage_minutes.c.rescans, func.count(), "hour", tasks.c.forced.is_(True)).label("rescans_per_hour"),
    _windowed(usage_minutes.c.probes, func.coalesce(func.sum(tasks.c.probe_count), 0), "day")
    .label("probes_per_day"),
)
# A submit checked against limits reads the usage and the queue's length in one statement.
USAGE_AND_WAITING = USAGE.add_columns(_COUNT_WAITING.scalar_subquery().label("waiting"))


def _add_usage(dialect: str) -> Any:
    statement = DIALECT_INSERTS[dialect](usage_minutes)
    return statement.on_conflict_do_update(index_elements=["owner", "minute"], set_={
        name: usage_minutes.c[name] + statement.excluded[name] for name in ("scans", "addresses", "rescans", "probes")})


# A new top-level task's part of its owner's usage, added to its minute.
_ADD_USAGE = {dialect: _add_usage(dialect) for dialect in DIALECT_INSERTS}


def usage_params(owner: str, now: float) -> dict[str, Any]:
    """The parameters of the usage statement at `now`. A window's first minute is the one its start falls in."""
    params: dict[str, Any] = {"p_owner": owner}
    for window, seconds in (("minute", 60), ("hour", 3600), ("day", 86_400)):
        first = int((now - seconds) // 60)
        params |= {f"p_{window}_ago": now - seconds, f"p_{window}_first_minute": first,
                   f"p_{window}_first_minute_end": (first + 1) * 60.0}
    return params


def check_submission(conn: Connection, values: dict[str, Any], limits: Limits | None, *, max_queued: int,
                     new_tasks: int) -> None:
    """In the submitting transaction (which submissions take one at a time, so that limits
    hold across processes): RateLimited if the new task (a row's `values`) would pass one of
    the owner's `limits`, QueueFull if its `new_tasks` rows would pass the queue's bound."""
    if limits is None:
        waiting = conn.execute(_COUNT_WAITING).scalar_one()
    else:
        usage = _usage_in(conn, values["owner"], values["created_at"], USAGE_AND_WAITING)
        _check_limits(conn, values, limits, usage, new_tasks)
        waiting = usage["waiting"]
    if waiting + new_tasks > max_queued:
        raise QueueFull(f"the scan queue is full ({max_queued} tasks waiting); try again later or cancel queued tasks")


def add_usage(conn: Connection, dialect: str, values: dict[str, Any]) -> None:
    """Count a new top-level task (a row's `values`) in its owner's minute."""
    conn.execute(_ADD_USAGE[dialect], {
        "owner": values["owner"], "minute": int(values["created_at"] // 60), "scans": 1,
        "addresses": values["address_count"], "rescans": int(values["forced"]), "probes": values["probe_count"]})


def _check_limits(conn: Connection, values: dict[str, Any], limits: Limits, usage: dict[str, int],
                  nmap_runs: int) -> None:
    owner = values["owner"]
    # What the new task adds to each limit's count: its nmap runs (its shards), one scan, its
    # addresses and probes, and one rescan when forced.
    adds = {"concurrent_scans": nmap_runs, "scans_per_minute": 1, "addresses_per_day": values["address_count"],
            "probes_per_day": values["probe_count"]}
    if values["forced"]:
        adds["rescans_per_hour"] = 1
    passed = [(name, limit) for name, more in adds.items()
              if (limit := getattr(limits, name)) is not None and usage[name] + more > limit]
    if not passed:
        return
    name, limit = passed[0]
    label = name.replace("_per_", " per ").replace("_", " ")
    if name in WEIGHTS and values[WEIGHTS[name][0]] > limit:
        column, size, smaller = WEIGHTS[name]
        raise RateLimited(f"this scan {size.format(values[column])}, more than the {limit} {label} of "
                          f"token '{owner}'; scan {smaller}")
    if name == "concurrent_scans" and nmap_runs > limit:
        raise RateLimited(f"this scan runs as {nmap_runs} nmap processes (one per shard), more than the {limit} "
                          f"concurrent scans of token '{owner}'; scan a smaller range")
    if name == "concurrent_scans":
        raise RateLimited(f"{limit} concurrent scans for token '{owner}'; retry when one of them has finished "
                          "(list_tasks shows them)")
    wait_s = _retry_after(conn, name, limit, values)
    this_scan = f" (this scan sends {values['probe_count']})" if name == "probes_per_day" else ""
    raise RateLimited(f"{limit} {label} for token '{owner}'{this_scan}; retry in {max(1, round(wait_s))} s")


def check_engagement_probes(conn: Connection, values: dict[str, Any], budget: int) -> None:
    """In the submitting transaction: RateLimited if the new task (a row's `values`) would pass
    its engagement's probes per day, counting every member's scans of the last 24 hours."""
    engagement, now, probes = values["engagement"], values["created_at"], values["probe_count"]
    if probes > budget:
        raise RateLimited(f"this scan sends {probes} probes (addresses x ports), more than the {budget} probes per "
                          f"day of engagement '{engagement}'; scan fewer addresses or ports")
    day = LIMIT_WINDOWS["probes_per_day"]
    assert day is not None
    counted = (tasks.c.engagement == engagement) & tasks.c.parent_id.is_(None) & (tasks.c.created_at > now - day)
    rows = conn.execute(select(tasks.c.created_at, tasks.c.probe_count).where(counted)
                        .order_by(tasks.c.created_at)).all()
    need = sum(row.probe_count for row in rows) + probes - budget
    if need <= 0:
        return
    wait_s = day
    for row in rows:
        need -= row.probe_count
        if need <= 0:
            wait_s = row.created_at + day - now
            break
    raise RateLimited(f"{budget} probes per day for engagement '{engagement}' (this scan sends {probes}); "
                      f"retry in {max(1, round(wait_s))} s")


def _usage_in(conn: Connection, owner: str, now: float, statement: Any = USAGE) -> dict[str, int]:
    row = conn.execute(statement, usage_params(owner, now)).one()
    return {name: int(value) for name, value in row._mapping.items()}


def _retry_after(conn: Connection, name: str, limit: int, values: dict[str, Any]) -> float:
    """Seconds until enough of the window's tasks have aged out for the new task to fit."""
    window = LIMIT_WINDOWS[name]
    assert window is not None
    owner, now = values["owner"], values["created_at"]
    counted = (tasks.c.owner == owner) & tasks.c.parent_id.is_(None) & (tasks.c.created_at > now - window)
    if name == "rescans_per_hour":
        counted &= tasks.c.forced.is_(True)
    column = WEIGHTS[name][0] if name in WEIGHTS else None
    rows = conn.execute(select(tasks.c.created_at, tasks.c.address_count, tasks.c.probe_count).where(counted)
                        .order_by(tasks.c.created_at)).all()
    weight = [row._mapping[column] if column else 1 for row in rows]
    need = sum(weight) + (values[column] if column else 1) - limit
    for row, amount in zip(rows, weight, strict=True):
        need -= amount
        if need <= 0:
            return float(row.created_at + window - now)
    return window


class UsageStore:
    """What the limits count, read for a caller (the `limits` tool) and purged with age."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def usage(self, owner: str) -> dict[str, int]:
        """What the caller's limits count now: scans running or queued, in the last minute,
        addresses and probes in the last day, forced rescans in the last hour."""
        return await self._db.run(self._usage, owner)

    def _usage(self, owner: str) -> dict[str, int]:
        with self._db.reading() as conn:
            return _usage_in(conn, owner, time.time())

    async def purge(self, before: float) -> int:
        """Delete the per-minute usage counted before `before`; how many minutes."""
        return await self._db.purge(_delete_old_minutes, before)


def _delete_old_minutes(conn: Connection, before: float, batch: int) -> int:
    key = list(usage_minutes.primary_key.columns)
    stale = select(*key).where(usage_minutes.c.minute < int(before // 60)).limit(batch)
    return conn.execute(usage_minutes.delete().where(tuple_(*key).in_(stale))).rowcount
