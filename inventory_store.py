"""The inventory's rows: read for find_hosts and top_values, written when a completed scan is
folded in (inventory.py decides what changes; these statements read and write it)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
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
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from db import INVENTORY_LOCK, Database, upsert
from inventory import (
    HostQuery,
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
    ValueCount,
    inventory_hosts,
    inventory_ports,
)
from targets import IPNetwork

T = TypeVar("T")
# Rows written (and addresses looked up) per statement: far below SQLite's limit of bound parameters.
_CHUNK = 500
_OWNER: BindParameter[str] = bindparam("p_owner")
_TAKE_INVENTORY_LOCK = select(func.pg_advisory_xact_lock(INVENTORY_LOCK, func.hashtext(_OWNER)))
_KNOWN_HOSTS = select(inventory_hosts).where(
    inventory_hosts.c.owner == _OWNER,
    inventory_hosts.c.address_key.between(bindparam("p_low"), bindparam("p_high")))
# The port rows of a batch of addresses, read by the range of their address_key: the
# (owner, address_key) index serves it whatever the planner knows. `address IN (batch)` had
# PostgreSQL, before its first ANALYZE of a table one big scan filled, read every port row of
# the owner for each batch of the next scan, comparing each with every address of the batch
# (a re-fold of 4,096 hosts beside 16,384 others: 6.2 s reading, 0.04 s by range).
_KNOWN_PORTS = select(inventory_ports).where(
    inventory_ports.c.owner == _OWNER, inventory_ports.c.address_key.between(bindparam("p_low"), bindparam("p_high")))
_WRITE_ROWS = {dialect: {table: upsert(dialect, table) for table in (inventory_hosts, inventory_ports)}
               for dialect in ("sqlite", "postgresql")}


# The columns an answer's models take as they are (the JSON ones are decoded): looked up once,
# as pydantic's model_fields is a property that costs a call for each column of each row.
_PORT_FIELDS = [name for name in InventoryPort.model_fields if name in inventory_ports.c and name not in (
    "cpe", "scripts")]
_HOST_FIELDS = [name for name in InventoryHost.model_fields if name in inventory_hosts.c and name != "hostnames"]


class InventoryRefused(RuntimeError):
    """The database refused the inventory rows of a completed scan (its transaction is lost)."""


def fold(conn: Connection, dialect: str, record: TaskRecord, result: ScanResult) -> None:
    """Fold a completed scan into its owner's inventory, in the transaction finishing it.

    Scans of one owner finishing at the same moment take turns (on PostgreSQL an advisory
    lock per owner; SQLite writes one at a time anyway), so each plans from what the other
    wrote. InventoryRefused when the database refuses the rows; a database that cannot be
    reached raises as everywhere (the verdict is tried again later)."""
    try:
        if dialect == "postgresql":
            conn.execute(_TAKE_INVENTORY_LOCK, {"p_owner": record.owner})
        _fold(conn, dialect, record, result)
    except (OperationalError, InterfaceError):
        raise
    except SQLAlchemyError as e:
        raise InventoryRefused(str(e)) from e


def _fold(conn: Connection, dialect: str, record: TaskRecord, result: ScanResult) -> None:
    scope = scope_of(record.argv)
    known_hosts: dict[str, Stored] = {}
    for network in scope.targets:  # a read per network: a scan names few, and the statement is built once
        low, high = network_bounds(network)
        for row in conn.execute(_KNOWN_HOSTS, {"p_owner": record.owner, "p_low": low, "p_high": high}).mappings():
            known_hosts[row["address"]] = row
    up = recorded_hosts(result, known_hosts)
    known_ports = {(row["address"], row["protocol"], row["port"]): row for row in _known_ports(conn, record.owner, up)}
    plan = plan_update(record.owner, record.id, result, scope, known_hosts, known_ports, time.time(),
                       versions=looks_at_versions(record.kind, record.argv))
    for table, rows in ((inventory_hosts, plan.hosts), (inventory_ports, plan.ports)):
        for chunk in _chunks(rows, _CHUNK):
            conn.execute(_WRITE_ROWS[dialect][table], chunk)


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
