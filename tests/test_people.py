"""Who a person is and what role they get, from the claims an OpenID provider gives (oauth.py)."""

from __future__ import annotations

from config import RoleConfig
from oauth import Person, person_of

ROLES = {
    "admins": RoleConfig(emails=["Boss@Example.test"], ui_admin=True),
    "scanners": RoleConfig(groups=["scanners", "/acme/scanners"]),
    "staff": RoleConfig(email_domains=["example.test"], tools=["list_tasks"]),
}


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
    assert person_of(claims, ROLES, "groups") == "dee@other.test is in no role (groups: nothing)"


def test_without_a_verified_email_nobody_is_known() -> None:
    unverified = {"sub": "5", "email": "boss@example.test", "email_verified": False, "groups": ["scanners"]}
    assert person_of(unverified, ROLES, "groups") == "the provider gave no verified email for subject '5'"
    assert person_of({"sub": "6", "groups": ["scanners"]}, ROLES, "groups") == (
        "the provider gave no verified email for subject '6'")
