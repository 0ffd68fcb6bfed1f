"""Who a person is and what role they get, from the claims an OpenID provider gives (oauth.py)."""

from __future__ import annotations

import time

import pytest

from argv_check import ArgvCheck, TaskRefused
from config import RoleConfig, Settings
from models import ScanKind, TaskRecord, TaskStatus
from oauth import Person, Refused, RoleBook, person_of
from policy import Policy
from scans import ScanService
from tests.nodes import opened_stores
from tests.support import own_user_sandbox

pytestmark = pytest.mark.anyio
NMAP = "/usr/bin/nmap"

ROLES = {
    "admins": RoleConfig(emails=["Boss@Example.test"], ui_admin=True),
    "scanners": RoleConfig(groups=["scanners", "/acme/scanners"]),
    "staff": RoleConfig(email_domains=["example.test"], tools=["list_tasks"]),
}


def record_of(argv: list[str], owner: str) -> TaskRecord:
    return TaskRecord(id="t", owner=owner, kind=ScanKind.CUSTOM, target="", argv=argv, status=TaskStatus.RUNNING,
                      time_limit=60, created_at=time.time(), started_at=None, finished_at=None, error=None)


def test_the_first_role_in_config_order_that_matches_wins() -> None:
    boss = person_of({"sub": "1", "email": "boss@example.test", "groups": ["scanners"]}, ROLES, "groups")
    assert boss == Person(owner="boss@example.test", name="boss@example.test", role="admins")
    scanner = person_of({"sub": "2", "email": "Ann@Example.test", "name": "Ann", "groups": ["/acme/scanners"]},
                        ROLES, "groups")
    assert scanner == Person(owner="ann@example.test", name="Ann", role="scanners")
    assert person_of({"sub": "3", "email": "cy@example.test"}, ROLES, "groups") == Person(
        owner="cy@example.test", name="cy@example.test", role="staff")


def test_groups_come_from_the_configured_claim_as_a_list_or_one_string() -> None:
    claims = {"sub": "4", "email": "dee@other.test", "roles": "scanners", "groups": ["nothing"]}
    assert person_of(claims, ROLES, "roles") == Person(owner="dee@other.test", name="dee@other.test", role="scanners")
    assert person_of(claims, ROLES, "groups") == Refused("dee@other.test is in no role (groups: nothing)",
                                                         "dee@other.test")


def test_without_a_verified_email_nobody_is_known() -> None:
    unverified = {"sub": "5", "email": "boss@example.test", "email_verified": False, "groups": ["scanners"]}
    assert person_of(unverified, ROLES, "groups") == Refused("the provider gave no verified email for subject '5'")
    assert person_of({"sub": "6", "groups": ["scanners"]}, ROLES, "groups") == Refused(
        "the provider gave no verified email for subject '6'")


async def test_a_person_s_role_reaches_every_process_and_leaves_with_them(database_url: str) -> None:
    """Process A checks a person's request (their claims give the role); process B runs a scan
    for them without one (a worker's check, a schedule's run): B reads the role from the people
    table. Once their claims put them in no role, B gives them no grant at all."""
    settings = Settings(roles={"scanners": RoleConfig(groups=["scanners"], allowed_targets=["127.0.0.0/8"])},
                        allow_loopback=True, nmap_path=NMAP)
    ann = Person(owner="ann@example.test", name="Ann", role="scanners")
    async with opened_stores(database_url, max_queued=10) as a, opened_stores(database_url, max_queued=10) as b:
        api = ScanService(a, Policy(settings, NMAP, RoleBook(a.people)), settings, NMAP, None,
                          sandbox=own_user_sandbox())
        elsewhere = Policy(settings, NMAP, RoleBook(b.people))
        worker = ArgvCheck.of_worker(NMAP, elsewhere, privileged=False, pool="default")
        await api.policy.people.admit(ann)
        argv = (await api.check(ann.owner, api.custom("-sT -n -p 22 127.0.0.1"))).argv
        assert not elsewhere.may(ann.owner, "custom_scan"), "no role known in B before it reads the table"
        assert await worker.argv_to_run(record_of(argv, ann.owner)) == argv
        assert elsewhere.may(ann.owner, "custom_scan") and elsewhere.owners() == [ann.owner]
        await api.policy.people.forget(ann.owner)
        with pytest.raises(TaskRefused, match="its targets are not allowed here"):
            await worker.argv_to_run(record_of(argv, ann.owner))
        assert not elsewhere.may(ann.owner, "custom_scan")
