"""Approvals: scans an engagement says a person must approve first (engagements.ApprovalRules),
decided by an approver (a grant with approve_scans) in /ui or with decide_approval. Nobody
decides their own scan; a request nobody decides in time is denied; every decision is audited
with the approver's name (a tool's call by the audit middleware, /ui's by the dashboard)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Literal

import mcp_types
from pydantic import BaseModel, ValidationError

from approval_store import ApprovalRecord, ApprovalStore
from audit import Auditor
from change_feed import wait_set
from db import DatabaseUnavailable
from engagements import iso_utc
from policy import Forbidden, Policy

logger = logging.getLogger(__name__)
Decision = Literal["approve", "deny"]
RECORDED = {"approve": "approved", "deny": "denied"}
# At most this many pending approvals in one answer.
PENDING_LIMIT = 100
# Each process looks for approvals nobody decided in time when the next pending one is due,
# and when a scan starts waiting for one (approval_store.REQUESTED_KEY); at least this often
# besides (a request whose notification was lost), and this soon again after a failed look.
EXPIRY_RECHECK_SECONDS = 60.0
EXPIRY_RETRY_SECONDS = 5.0


# The key of the one input request a held scan makes of its requester (2026-07-28 clients).
APPROVAL_INPUT = "approval"
JUSTIFICATION_SCHEMA = {
    "type": "object",
    "properties": {"justification": {"type": "string", "title": "Why this scan is needed", "maxLength": 500}},
    "required": ["justification"],
}


def input_request(held: str) -> mcp_types.InputRequests:
    """What a held scan asks of its requester: their reason, for the approvers (`held` says
    what holds it); declining withdraws the scan."""
    message = f"{held} Give the approvers your reason for it, or decline to withdraw the scan."
    return {APPROVAL_INPUT: mcp_types.ElicitRequest(params=mcp_types.ElicitRequestFormParams(
        message=message, requested_schema=JUSTIFICATION_SCHEMA))}


def reply_of(responses: Mapping[str, object] | None) -> tuple[bool, str | None]:
    """(whether the requester keeps the scan, their reason) from their answer, as a client's
    retry carries it or as JSON (tasks/update); no answer, or one unreadable, keeps it."""
    response = (responses or {}).get(APPROVAL_INPUT)
    if isinstance(response, dict):
        with contextlib.suppress(ValidationError):
            response = mcp_types.ElicitResult.model_validate(response)
    if not isinstance(response, mcp_types.ElicitResult):
        return True, None
    if response.action != "accept":
        return False, None
    text = (response.content or {}).get("justification")
    return True, str(text)[:500] if text else None


class ApprovalInfo(BaseModel):
    """A scan that waits (or waited) for a person's yes: what it would run, why it needs one."""

    task_id: str
    engagement: str
    requested_by: str
    kind: str
    target: str
    argv: list[str]
    pool: str
    reasons: list[str]
    justification: str | None = None
    requested_at: str
    expires_at: str
    decision: str | None = None
    decided_by: str | None = None
    decision_reason: str | None = None


class ApprovalList(BaseModel):
    """The scans waiting for an approver, oldest first."""

    approvals: list[ApprovalInfo]


def shown(record: ApprovalRecord) -> ApprovalInfo:
    return ApprovalInfo(
        task_id=record.task_id, engagement=record.engagement, requested_by=record.requested_by, kind=record.kind,
        target=record.target, argv=record.argv[1:], pool=record.pool, reasons=record.reasons,
        justification=record.justification, requested_at=iso_utc(record.requested_at) or "",
        expires_at=iso_utc(record.expires_at) or "", decision=record.decision, decided_by=record.decided_by,
        decision_reason=record.decision_reason)


class ApprovalDesk:
    """What approvers see and do."""

    def __init__(self, store: ApprovalStore, policy: Policy) -> None:
        self._store = store
        self._policy = policy

    async def pending(self, approver: str) -> ApprovalList:
        self._policy.require(approver, "list_approvals")
        return ApprovalList(approvals=[shown(record) for record in await self._store.pending(PENDING_LIMIT)])

    async def decide(self, approver: str, task_id: str, decision: Decision, reason: str) -> ApprovalInfo:
        """Approve or deny a waiting scan as `approver`; the task runs or ends denied."""
        if not self._policy.may(approver, "decide_approval"):
            raise Forbidden("only an approver (a grant with approve_scans) decides approvals")
        return shown(await self._store.decide(task_id, approver, RECORDED[decision], reason))


async def expire_forever(store: ApprovalStore, auditor: Auditor) -> None:
    """Deny the approvals nobody decided in time, each audited as the server's
    `expire_approval` (a decision, though no person's): asleep until the next pending one is
    due or a new request comes (it polled every 5 s: 12 reads a minute in each process)."""
    while True:
        with store.requested() as requested:
            try:
                denied, due = await store.expire()
            except DatabaseUnavailable:
                denied, due = [], time.time() + EXPIRY_RETRY_SECONDS
            for task_id in denied:
                logger.info("task %s: its approval expired, the scan is denied", task_id)
                with auditor.call(None, "expire_approval", {"task_id": task_id}, scans=False):
                    pass
            until_due_s = EXPIRY_RECHECK_SECONDS if due is None else due - time.time()
            await wait_set(requested, min(max(until_due_s, 0.0), EXPIRY_RECHECK_SECONDS))
