"""The inventory's rows: read for find_hosts and top_values, written when a completed scan is
folded in (inventory.py decides what changes; these statements read and write it).

A completed scan's fold runs after its verdict, a batch of FOLD_BATCH_HOSTS hosts per
transaction read from its stored chunks (result_store.hosts_after), with FOLD_KNOWN_HOSTS known
hosts of its scope at most, its cursor moved in the same transaction; a token's folds run in
the order of their verdicts' commits (tasks.fold_order). A result of one batch at most whose
owner has no fold pending is folded in its verdict's transaction (fold_now), and the rest of
its scope's known hosts, if they are more than a batch reads, after it."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import (
    BindParameter,
    Connection,
    Select,
    Table,
    bindparam,
    func,
    literal_column,
    or_,
    select,
    tuple_,
    union,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from db import INVENTORY_LOCK, Database, upsert, upsert_set
from findings import CHUNK_HOSTS
from inventory import (
    HostQuery,
    Scope,
    Stored,
    address_key,
    looks_at_versions,
    network_bounds,
    plan_update,
    recorded_hosts,
    scope_of,
)
from models import (
    InventoryHost,
    InventoryPort,
    InventoryText,
    ScanResult,
    ServiceText,
    TaskRecord,
    TaskStatus,
    ValueCount,
    inventory_hosts,
    inventory_ports,
    stored_result,
    tasks,
)
from result_store import HostRun, hosts_after
from targets import IPNetwork

T = TypeVar("T")
# Rows written (and addresses looked up) per statement: far below SQLite's limit of bound parameters.
_CHUNK = 500
_OWNER: BindParameter[str] = bindparam("p_owner")
_TAKE_INVENTORY_LOCK = select(func.pg_advisory_xact_lock(INVENTORY_LOCK, func.hashtext(_OWNER)))
# The owner's hosts of a range of address keys, in order: from p_low on (_FROM) or after it
# (_AFTER, where a fold's cursor is), up to p_high, p_limit at most; one range of the
# (owner, address_key) index, however many hosts the owner has around it.
_KNOWN_HOSTS = (select(inventory_hosts)
                .where(inventory_hosts.c.owner == _OWNER, inventory_hosts.c.address_key <= bindparam("p_high"))
                .order_by(inventory_hosts.c.address_key).limit(bindparam("p_limit")))
_KNOWN_HOSTS_FROM = _KNOWN_HOSTS.where(inventory_hosts.c.address_key >= bindparam("p_low"))
_KNOWN_HOSTS_AFTER = _KNOWN_HOSTS.where(inventory_hosts.c.address_key > bindparam("p_low"))
# The port rows of a batch of addresses, read by the range of their address_key: the
# (owner, address_key) index serves it whatever the planner knows. `address IN (batch)` had
# PostgreSQL, before its first ANALYZE of a table one big scan filled, read every port row of
# the owner for each batch of the next scan, comparing each with every address of the batch
# (a re-fold of 4,096 hosts beside 16,384 others: 6.2 s reading, 0.04 s by range).
_KNOWN_PORTS = select(inventory_ports).where(
    inventory_ports.c.owner == _OWNER, inventory_ports.c.address_key.between(bindparam("p_low"), bindparam("p_high")))
# Hosts folded per transaction: what a fold holds in memory and the longest any other writer
# waits for it (SQLite writes one at a time; on PostgreSQL the owner's verdicts take turns with it).
FOLD_BATCH_HOSTS = 256
# Known hosts of the scan's scope a batch reads (and may mark down) at most: where they run out
# before its hosts do, the batch ends at the last of them, and the next one goes on from there.
# A scan of a /8 that found a few hosts, against an inventory of 100,000 in it, marks them
# down this many per transaction, not all in one (which read every row into memory, and held
# SQLite's write lock throughout).
FOLD_KNOWN_HOSTS = FOLD_BATCH_HOSTS
_BATCH_CHUNKS = max(FOLD_BATCH_HOSTS // CHUNK_HOSTS, 1)
_LAST = 2**62
_PENDING = tasks.c.fold_order.is_not(None)
_LAST_FOLD_ORDER = select(func.coalesce(func.max(tasks.c.fold_order), 0)).where(tasks.c.owner == _OWNER, _PENDING)
_FIRST_PENDING_FOLD = (
    select(tasks.c.id, tasks.c.owner, tasks.c.kind, tasks.c.target, tasks.c.argv, tasks.c.created_at,
           tasks.c.finished_at, tasks.c.parent_id, tasks.c.shard_count, tasks.c.fold_order, tasks.c.fold_after,
           tasks.c.result)
    .where(tasks.c.owner == _OWNER, _PENDING, tasks.c.fold_order <= bindparam("p_through"))
    .order_by(tasks.c.fold_order, tasks.c.id).limit(1)
)
_THE_TASK = tasks.c.id == bindparam("p_id")
_MOVE_FOLD_CURSOR = update(tasks).where(_THE_TASK, _PENDING)
_LEAVE_FOLD_PENDING = update(tasks).where(_THE_TASK)
_END_FOLD = update(tasks).where(_THE_TASK).values(fold_order=None, fold_after=None, fold_lease=None)
_LOCK_TASK = select(tasks.c.status).where(_THE_TASK).with_for_update()
_STALE_FOLD_OWNERS = select(tasks.c.owner).where(
    _PENDING, func.coalesce(tasks.c.fold_lease, 0.0) < bindparam("p_now")).distinct()
_WRITE_ROWS = {table: upsert("sqlite", table) for table in (inventory_hosts, inventory_ports)}
_WRITE_ROW_SET = {table: upsert_set(table) for table in (inventory_hosts, inventory_ports)}


# The columns an answer's models take as they are (the JSON ones are decoded): looked up once,
# as pydantic's model_fields is a property that costs a call for each column of each row.
_PORT_FIELDS = [name for name in InventoryPort.model_fields if name in inventory_ports.c and name not in (
    "cpe", "scripts")]
_HOST_FIELDS = [name for name in InventoryHost.model_fields if name in inventory_hosts.c and name != "hostnames"]


class InventoryRefused(RuntimeError):
    """The database refused the inventory rows of a completed scan's batch (its transaction is lost)."""

    def __init__(self, task_id: str, message: str) -> None:
        super().__init__(message)
        self.task_id = task_id


@dataclass(frozen=True)
class FoldStep:
    """A batch folded: of which task (and its place among its owner's folds), the change-feed
    keys of that task (and of its parent), and whether its fold is done."""

    task_id: str
    order: int
    keys: tuple[str, ...]
    done: bool


def take_fold_turn(conn: Connection, owner: str) -> None:
    """Make the owner's other folds and verdicts wait for the end of this transaction (on
    PostgreSQL an advisory lock per owner; SQLite writes one at a time anyway)."""
    if conn.dialect.name == "postgresql":
        conn.execute(_TAKE_INVENTORY_LOCK, {"p_owner": owner})


def next_fold_order(conn: Connection, owner: str) -> int:
    """The place of a fold the caller's transaction is about to make pending, after each of
    the owner's pending folds: in the order of the verdicts' commits, as the turn is held to
    the commit."""
    take_fold_turn(conn, owner)
    return int(conn.execute(_LAST_FOLD_ORDER, {"p_owner": owner}).scalar_one()) + 1


def fold_next(conn: Connection, owner: str, lease_s: float, through: int | None = None) -> FoldStep | None:
    """Fold the next batch of the owner's first pending fold (of those placed at `through` or
    before); None when there is none. A batch is FOLD_BATCH_HOSTS of the result's hosts, read
    from its chunks after the last host folded, and it moves that cursor in the same
    transaction: a crash loses the batch whole, and the next call folds it again.

    Each batch marks down the known hosts of the scan's scope between its cursor and its last
    host (the last batch: to the end of the scope) that the scan did not find up, and stamps
    what it writes with the scan's finish time: a batch folded twice writes the same rows. A
    batch reads FOLD_KNOWN_HOSTS known hosts at most: where they run out first, it ends at the
    last of them (and the batches after the scan's last host go through the rest of its scope
    so), whatever the scope and the inventory hold.
    InventoryRefused when the database refuses the rows; a database that cannot be reached
    raises as everywhere."""
    pending = _take_first_pending(conn, owner, through)
    if pending is None:
        return None
    record = _fold_record(pending)
    step = partial(FoldStep, record.id, pending.fold_order, record.keys)
    try:
        # A sharded scan's hosts are its shards', each folded as it ended.
        if record.shard_count or pending.result is None:
            _finish_fold(conn, record)
            return step(True)
        scope = scope_of(record.argv)
        batch = hosts_after(conn, record.id, pending.fold_after, _BATCH_CHUNKS)
        if batch.last is None and record.parent_id is not None:
            # A shard whose hosts its parent adopted (settle_parent): those of its scope, where they now are.
            batch = _adopted_hosts(conn, record.parent_id, scope, pending.fold_after)
        cursor = _fold_batch(conn, record, stored_result(pending.result).model_copy(update={"hosts": batch.hosts}),
                             scope, (pending.fold_after, batch.last if batch.more else None))
        if cursor is not None:
            conn.execute(_MOVE_FOLD_CURSOR, {"p_id": record.id, "fold_after": cursor,
                                             "fold_lease": time.time() + lease_s})
            return step(False)
        _finish_fold(conn, record)
        return step(True)
    except (OperationalError, InterfaceError):
        raise
    except SQLAlchemyError as e:
        raise InventoryRefused(record.id, str(e)) from e


def fold_now(conn: Connection, record: TaskRecord, result: ScanResult, now: float, lease_s: float) -> bool:
    """Fold a result of one batch of hosts at most (FOLD_BATCH_HOSTS) in the caller's
    transaction, its verdict's, stamped `now` (its finish time): for a scan none of whose
    owner's folds is pending (next_fold_order gave 1), so that it keeps its turn. False when
    its scope holds more known hosts than a batch reads: the rest is left pending, the owner's
    first fold, for fold_next to go on with after the commit. InventoryRefused as fold_next."""
    try:
        cursor = _fold_batch(conn, replace(record, finished_at=now), result, scope_of(record.argv), (None, None))
    except (OperationalError, InterfaceError):
        raise
    except SQLAlchemyError as e:
        raise InventoryRefused(record.id, str(e)) from e
    if cursor is not None:
        conn.execute(_LEAVE_FOLD_PENDING, {"p_id": record.id, "fold_order": 1, "fold_after": cursor,
                                           "fold_lease": time.time() + lease_s})
    return cursor is None


def abandon_fold(conn: Connection, task_id: str) -> None:
    """Give up a fold the database refused (a bug): what its earlier batches wrote stays, and
    the owner's later folds go on."""
    conn.execute(_END_FOLD, {"p_id": task_id})


def stale_fold_owners(conn: Connection, now: float) -> list[str]:
    """The owners of pending folds whose process stopped folding them (their lease ran out)."""
    return list(conn.execute(_STALE_FOLD_OWNERS, {"p_now": now}).scalars())


def _take_first_pending(conn: Connection, owner: str, through: int | None) -> Any:
    take_fold_turn(conn, owner)
    return conn.execute(_FIRST_PENDING_FOLD, {"p_owner": owner, "p_through": _LAST if through is None else through}
                        ).first()


def _fold_record(row: Row[Any]) -> TaskRecord:
    return TaskRecord.from_row({**row._mapping, "status": TaskStatus.COMPLETED.value, "time_limit": 0})


def _adopted_hosts(conn: Connection, parent_id: str, scope: Scope, after: str | None) -> HostRun:
    """A shard's hosts after `after` among its parent's, which hold every shard's (the shards
    of a scan cover disjoint addresses); the cursor moves over the others too."""
    if not scope.targets:
        return HostRun([], None, False)
    first = min(scope.targets, key=lambda network: network_bounds(network)[0])
    last = max(scope.targets, key=lambda network: network_bounds(network)[1])
    run = hosts_after(conn, parent_id, after, _BATCH_CHUNKS, (str(first.network_address), str(last.broadcast_address)))
    return run._replace(hosts=[host for host in run.hosts if host.address in scope])


def _finish_fold(conn: Connection, record: TaskRecord) -> None:
    """The fold's last batch: no longer pending. A shard whose parent has settled lets go of
    its result's head, which settle_parent kept for the fold (its parent's merged head holds
    it now); one whose parent has not, keeps it for settle_parent, which drops it then. The
    parent's row is locked first, so that a shard's fold ending while its parent settles is
    seen by one or the other."""
    settled = record.parent_id is not None and TaskStatus(
        conn.execute(_LOCK_TASK, {"p_id": record.parent_id}).scalar_one()).finished
    conn.execute(_END_FOLD.values(result=None, result_hosts=None) if settled else _END_FOLD, {"p_id": record.id})


def _fold_batch(conn: Connection, record: TaskRecord, result: ScanResult, scope: Scope,
                span: tuple[str | None, str | None]) -> str | None:
    """Fold `result` (a batch of the scan's hosts, in order) with the known hosts of `scope`
    after the address span[0] up to span[1] (None: from the start, to the end), FOLD_KNOWN_HOSTS
    of them at most: where they run out first, only up to the last of them. The address the
    batch folded up to, for the next one to go on after; None when the fold is done."""
    after = "" if span[0] is None else address_key(span[0])
    until = "~" if span[1] is None else address_key(span[1])
    known_hosts = _known_hosts(conn, record.owner, scope, after, until)
    end = span[1]
    if len(known_hosts) == FOLD_KNOWN_HOSTS:
        last = next(reversed(known_hosts.values()))
        if last["address_key"] < until:
            until, end = last["address_key"], last["address"]
            result = result.model_copy(update={"hosts": [
                host for host in result.hosts if address_key(host.address) <= until]})
    up = recorded_hosts(result, known_hosts)
    known_ports = {(row["address"], row["protocol"], row["port"]): row for row in _known_ports(conn, record.owner, up)}
    plan = plan_update(record.owner, record.id, result, scope, known_hosts, known_ports,
                       record.finished_at or time.time(), versions=looks_at_versions(record.kind, record.argv))
    for table, rows in ((inventory_hosts, plan.hosts), (inventory_ports, plan.ports)):
        _write(conn, table, rows)
    return end


def _write(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """Upsert `rows` of `table`: on PostgreSQL in one statement, on SQLite a step per row (see upsert_set)."""
    if conn.dialect.name == "postgresql":
        if rows:
            conn.execute(_WRITE_ROW_SET[table], {"p_rows": rows})
        return
    for chunk in _chunks(rows, _CHUNK):
        conn.execute(_WRITE_ROWS[table], chunk)


def _known_hosts(conn: Connection, owner: str, scope: Scope, after: str, until: str) -> dict[str, Stored]:
    """The owner's hosts in the networks of `scope` with an address key after `after` up to
    `until`, by address in address order, FOLD_KNOWN_HOSTS at most: a read per network (a scan
    names few, and the statement is built once), each one range of the index."""
    known: dict[str, Stored] = {}
    for low, high in _key_ranges(scope.targets):
        if len(known) == FOLD_KNOWN_HOSTS or low > until:
            break
        if high <= after:
            continue
        statement = _KNOWN_HOSTS_AFTER if low <= after else _KNOWN_HOSTS_FROM
        rows = conn.execute(statement, {"p_owner": owner, "p_low": max(low, after), "p_high": min(high, until),
                                        "p_limit": FOLD_KNOWN_HOSTS - len(known)}).mappings()
        known.update((row["address"], row) for row in rows)
    return known


def _key_ranges(networks: Iterable[IPNetwork]) -> list[tuple[str, str]]:
    """The address-key ranges of `networks`, in order, those that overlap merged: each address
    in one, so that a host is read once."""
    ranges: list[tuple[str, str]] = []
    for low, high in sorted(network_bounds(network) for network in networks):
        if ranges and low <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], high))
        else:
            ranges.append((low, high))
    return ranges


def _known_ports(conn: Connection, owner: str, addresses: Iterable[str]) -> Iterator[Stored]:
    """The port rows of `addresses`, read in batches of consecutive addresses: the rows of the
    range a batch spans, less those of addresses between them that are not in the batch."""
    ordered = sorted((address_key(address), address) for address in addresses)
    for chunk in _chunks(ordered, _CHUNK):
        wanted = {address for _, address in chunk}
        # As mappings: copying each row into a dict took three times as long as reading it.
        rows = conn.execute(_KNOWN_PORTS, {"p_owner": owner, "p_low": chunk[0][0], "p_high": chunk[-1][0]})
        yield from (row for row in rows.mappings() if row["address"] in wanted)


class InventoryStore:
    """A token's inventory as find_hosts and top_values read it."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def find_hosts(self, owner: str, query: HostQuery, limit: int,
                         offset: int) -> tuple[list[InventoryHost], int]:
        """A page of the owner's inventory hosts matching `query`, and how many match in all."""
        return await self._db.run(self._find_hosts, owner, query, limit, offset)

    async def unseen(self, owner: str, networks: Sequence[IPNetwork]) -> list[IPNetwork]:
        """Those of `networks` in which the owner's inventory holds no host at all."""
        return await self._db.run(self._unseen, owner, list(networks))

    def _unseen(self, owner: str, networks: list[IPNetwork]) -> list[IPNetwork]:
        hosts = inventory_hosts.c
        with self._db.reading() as conn:
            return [network for network in networks if conn.execute(
                select(hosts.address).where(hosts.owner == owner,
                                            hosts.address_key.between(*network_bounds(network))).limit(1)
            ).first() is None]

    async def top_values(self, owner: str, field: str, query: HostQuery, limit: int) -> list[ValueCount]:
        """The owner's most common values of `field` (port, service, product, version, os, status)."""
        return await self._db.run(self._top_values, owner, field, query, limit)

    async def purge(self, before: float) -> tuple[int, int]:
        """Delete hosts and ports last seen before `before`; how many of each."""
        return (await self._db.purge(_stale_rows_of(inventory_hosts), before),
                await self._db.purge(_stale_rows_of(inventory_ports), before))

    def _find_hosts(self, owner: str, query: HostQuery, limit: int, offset: int) -> tuple[list[InventoryHost], int]:
        """Hosts matching `query`, by address, with their matching ports; and how many match."""
        hosts, ports = inventory_hosts.c, inventory_ports.c
        with self._db.reading() as conn:
            if query.by_port:
                # From the ports' side: on 5,000 matching hosts, paging the distinct addresses of
                # their ports took 0.4 ms (SQLite) and 3.3 ms (PostgreSQL), hosts IN those ports 5.5 and 18.7.
                matched = _ports_shown(owner, query, ports.address_key, ports.address).distinct()
                total = conn.execute(select(func.count()).select_from(matched.subquery())).scalar_one()
                page = conn.execute(matched.order_by(ports.address_key).limit(limit).offset(offset)).all()
                addresses = [row.address for row in page]
                host_rows = conn.execute(select(inventory_hosts).where(
                    hosts.owner == owner, hosts.address.in_(addresses))).all()
            else:
                matching = _host_conditions(owner, query)
                total = conn.execute(select(func.count()).select_from(inventory_hosts).where(*matching)).scalar_one()
                host_rows = conn.execute(select(inventory_hosts).where(*matching)
                                         .order_by(hosts.address_key).limit(limit).offset(offset)).all()
                addresses = [row.address for row in host_rows]
            port_rows = conn.execute(
                _ports_shown(owner, query, inventory_ports).where(ports.address.in_(addresses))
                .order_by(ports.address_key, ports.protocol, ports.port)).all() if addresses else []
        by_host: dict[str, list[InventoryPort]] = defaultdict(list)
        for row in port_rows:
            by_host[row.address].append(_inventory_port(row))
        found = {row.address: _inventory_host(row, by_host[row.address]) for row in host_rows}
        return [found[address] for address in addresses if address in found], total

    def _top_values(self, owner: str, field: str, query: HostQuery, limit: int) -> list[ValueCount]:
        """The most common values of `field` among the owner's hosts (open ports for port fields),
        ties in the order of their values, byte by byte: the same answer in either database."""
        counted: Select[Any]
        if field in ("os", "status"):
            columns = [inventory_hosts.c[field]]
            counted = (select(*columns, func.count().label("n"))
                       .where(*_host_conditions(owner, query), columns[0] != "").group_by(*columns))
        else:
            ports = inventory_ports.c
            columns = [ports.port, ports.protocol] if field == "port" else (
                [ports.product, ports.version] if field == "version" else [ports[field]])
            # A port is always a value (an integer: comparing it with '' fails on PostgreSQL).
            given = [] if field == "port" else [columns[-1] != ""]
            # A host has a port once (the primary key): its rows are its hosts, counted from
            # the port's index alone.
            hosts_of = func.count() if field == "port" else func.count(ports.address.distinct())
            counted = _ports_shown(owner, query, *columns, hosts_of.label("n")).where(*given).group_by(*columns)
        ordered = counted.order_by(literal_column("n").desc(), *(self._bytewise(c) for c in columns))
        with self._db.reading() as conn:
            rows = conn.execute(ordered.limit(limit)).all()
        return [_value_count(field, row) for row in rows]

    def _bytewise(self, column: Any) -> Any:
        """`column` to sort by code point: SQLite's default; PostgreSQL's follows the database's
        locale (en_US puts 'nginx' before 'OpenSSH', C after)."""
        return column.collate("C") if self._db.dialect == "postgresql" and column.type.python_type is str else column


def _ports_shown(owner: str, query: HostQuery, *columns: Any) -> Select[Any]:
    """SELECT `columns` of the ports `query` shows: in its state (open unless asked), matching
    its port filters and its network; seen since `seen_since`; and when `changed_since` is
    given, changed since then, or of a host that did (came up or went down)."""
    ports = inventory_ports.c
    state = query.port_state
    exact = {ports.port: query.port, ports.protocol: query.protocol, ports.state: state,
             ports.service: query.service}
    conditions: list[Any] = [column == value for column, value in exact.items() if value is not None]
    # Text filters ignore case in both databases alike (SQLite's LIKE ignores it, PostgreSQL's does not).
    if query.product is not None:
        conditions.append(func.lower(ports.product) == query.product.lower())
    if query.version_prefix is not None:
        conditions.append(func.lower(ports.version).startswith(query.version_prefix.lower(), autoescape=True))
    if query.cpe is not None:
        conditions.append(func.lower(ports.cpe).contains(query.cpe.lower(), autoescape=True))
    if query.script is not None:
        conditions.append(func.lower(ports.scripts).contains(json.dumps(query.script.lower()), autoescape=True))
    conditions += _owner_network_seen(owner, query, inventory_ports)
    shown = select(*columns).where(*conditions)
    since = query.changed_since
    if since is None:
        return shown
    # Read by the addresses that changed (the (owner, changed_at, address) indexes); of those,
    # the ports that changed or whose host did. The OR alone read every port and host of the
    # owner (find_hosts(changed_since) 601 ms at 100k hosts on SQLite).
    changed_ports = select(ports.address).where(ports.owner == owner, ports.changed_at >= since)
    return shown.where(ports.address.in_(union(changed_ports, _changed_hosts(owner, since))),
                       or_(ports.changed_at >= since, ports.address.in_(_changed_hosts(owner, since))))


def _changed_hosts(owner: str, since: float) -> Select[Any]:
    """The addresses of the owner's hosts that changed (came up, went down) since `since`."""
    hosts = inventory_hosts.c
    return select(hosts.address).where(hosts.owner == owner, hosts.changed_at >= since)


def _host_conditions(owner: str, query: HostQuery) -> list[Any]:
    """The hosts a query without port filters finds; with `changed_since`, those that changed
    (came up, went down) or whose shown ports did: one IN of the two, each read from its
    (owner, changed_at) index, where an OR of them read every host of the owner."""
    conditions = _owner_network_seen(owner, query, inventory_hosts)
    since = query.changed_since
    if since is not None:
        ports = inventory_ports.c
        changed_ports = _ports_shown(owner, replace(query, changed_since=None), ports.address).where(
            ports.changed_at >= since)
        conditions.append(inventory_hosts.c.address.in_(union(_changed_hosts(owner, since), changed_ports)))
    return conditions


def _owner_network_seen(owner: str, query: HostQuery, table: Table) -> list[Any]:
    """Owner, network and seen_since filters, which both inventory tables have."""
    columns = table.c
    conditions: list[Any] = [columns.owner == owner]
    if query.network is not None:
        conditions.append(columns.address_key.between(*query.network))
    if query.seen_since is not None:
        conditions.append(columns.last_seen >= query.seen_since)
    return conditions


def _stale_rows_of(table: Table) -> Any:
    """A purge batch of `table`: rows last seen before the cut-off."""

    def delete_batch(conn: Connection, before: float, batch: int) -> int:
        key = list(table.primary_key.columns)
        stale = select(*key).where(table.c.last_seen < before).limit(batch)
        return conn.execute(table.delete().where(tuple_(*key).in_(stale))).rowcount

    return delete_batch


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


def _value_count(field: str, row: Row[Any]) -> ValueCount:
    """A counted value: the product and version are the target's text, the rest nmap's words."""
    if field == "port":
        return ValueCount(value=f"{row.port}/{row.protocol}", hosts=row.n)
    if field in ("product", "version"):
        return ValueCount(untrusted=ServiceText(**{key: row._mapping[key] for key in ("product", "version")
                                                  if key in row._mapping}), hosts=row.n)
    return ValueCount(value=str(row[0]), hosts=row.n)


def _inventory_port(row: Row[Any]) -> InventoryPort:
    data = row._mapping
    text = InventoryText(product=data["product"], version=data["version"], extrainfo=data["extrainfo"],
                         cpe=json.loads(data["cpe"]))
    return InventoryPort(**{k: data[k] for k in _PORT_FIELDS}, untrusted=text if any(text.texts()) else None,
                         scripts=json.loads(data["scripts"]))


def _inventory_host(row: Row[Any], ports: list[InventoryPort]) -> InventoryHost:
    data = row._mapping
    return InventoryHost(**{k: data[k] for k in _HOST_FIELDS}, hostnames=json.loads(data["hostnames"]), ports=ports)
