"""The engagement tools: list_engagements and get_engagement for every caller (the ones it
may scan under), create_engagement for operators (a grant with manage_engagements), and
list_approvals and decide_approval for approvers (a grant with approve_scans). Neither kind
is listed or callable for anyone else (policy.MANAGER_TOOLS, policy.APPROVER_TOOLS)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastmcp import FastMCP
from fastmcp.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from approvals import ApprovalDesk, ApprovalInfo, ApprovalList
from auth import Identify
from engagement_store import EngagementNotFound, EngagementStore
from engagements import (
    ENGAGEMENT_NAME,
    Engagement,
    EngagementInfo,
    EngagementList,
    EngagementRules,
    is_member,
    shown,
    state_of,
)
from errors import tool_errors
from policy import Policy
from tools import READ_ANNOTATIONS, TASK_ID, inlined_tool

EngagementName = Annotated[str, Field(pattern=ENGAGEMENT_NAME, description="The engagement's name")]


class EngagementBook:
    """The engagements as a caller sees them: those it may scan under, all for an operator."""

    def __init__(self, store: EngagementStore, policy: Policy) -> None:
        self._store = store
        self._policy = policy

    def _sees(self, owner: str, engagement: Engagement) -> bool:
        return self._policy.may(owner, "create_engagement") or is_member(engagement.rules, owner,
                                                                          self._policy.role(owner))

    async def list(self, owner: str) -> EngagementList:
        now = time.time()
        return EngagementList(engagements=[state_of(engagement, now) for engagement in await self._store.all()
                                           if self._sees(owner, engagement)])

    async def get(self, owner: str, name: str) -> EngagementInfo:
        engagement = await self._store.get(name)
        if not self._sees(owner, engagement):
            raise EngagementNotFound(f"there is no engagement {name!r}; list_engagements names those you may use")
        return shown(engagement, time.time())

    async def create(self, owner: str, name: str, rules: EngagementRules) -> EngagementInfo:
        if not rules.owner:
            rules = rules.model_copy(update={"owner": owner})
        return shown(await self._store.create(name, rules, owner), time.time())


def register_engagement_tools(mcp: FastMCP, schemas: dict[str, dict[str, Any]], book: EngagementBook,
                              desk: ApprovalDesk, identify: Identify) -> None:
    """Add the engagement tools to `mcp`, acting for the caller `identify` names."""

    def caller() -> str:
        name = identify()
        if name is None:
            raise ToolError("unauthenticated: this tool needs a valid token")
        return name

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS)
    async def list_engagements() -> EngagementList:
        """The engagements (rules of engagement) you may scan under, and whether each allows
        scans now or when it next does; get_engagement shows one's rules. Instant."""
        with tool_errors():
            return await book.list(caller())

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS)
    async def get_engagement(name: EngagementName) -> EngagementInfo:
        """One engagement's rules (scope, exclusions, allowed scans, windows, dates) and whether it
        allows scans now. Instant."""
        with tool_errors():
            return await book.get(caller(), name)

    @inlined_tool(mcp, schemas, annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                                            idempotent_hint=False, open_world_hint=False))
    async def create_engagement(name: EngagementName, rules: EngagementRules) -> EngagementInfo:
        """Create an engagement (operators only): scope (networks, host names), exclude, kinds,
        options, script_categories, windows ({days, start, end} in `timezone`), starts and ends
        (dates), and the tokens and roles that may scan under it. Names are never reused."""
        with tool_errors():
            return await book.create(caller(), name, rules)

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS, target_text=True)
    async def list_approvals() -> ApprovalList:
        """Scans waiting for an approver's yes (approvers only), oldest first: who asked, under
        which engagement, the exact nmap argv, why it needs approval, and until when. Instant."""
        with tool_errors():
            return await desk.pending(caller())

    @inlined_tool(mcp, schemas, annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                                            idempotent_hint=False, open_world_hint=True))
    async def decide_approval(
        task_id: Annotated[str, Field(pattern=TASK_ID, description="The task_id list_approvals shows")],
        decision: Annotated[Literal["approve", "deny"], Field(description="approve: it runs; deny: it ends denied")],
        reason: Annotated[str, Field(min_length=1, max_length=500, description="Why; kept with the decision")],
    ) -> ApprovalInfo:
        """Approve or deny a scan waiting for approval (approvers only; never your own scan)."""
        with tool_errors():
            return await desk.decide(caller(), task_id, decision, reason)
