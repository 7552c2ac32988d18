"""What a matched report does to its delivery: late outcomes per recipient.

Only the delivery's own recipients are touched (an address the report names that the
delivery was not sent to is noted, never acted on). Suppression follows the rules of
synchronous replies (``sending.outcomes.is_bad_mailbox``: RFC 3463 dead mailboxes only),
plus complaints always. A report about a report (a loop) does nothing.
"""

from __future__ import annotations

import re
from typing import Any

from maildaemon.addresses import lookup_key
from maildaemon.delivery import LateKind, LateOutcome
from maildaemon.reports.model import ParsedReport, RecipientReport, Target
from maildaemon.sending.outcomes import is_bad_mailbox
from maildaemon.sending.reply import Reply

_REPLY_CODE = re.compile(r"(?:^|[;\s])([245]\d\d)(?=[\s-]|$)")
_OUTCOME: dict[str, LateKind] = {
    "failed": "bounced",
    "delayed": "delayed",
    "complained": "complained",
}


def reply_code(recipient: RecipientReport) -> int | None:
    """The remote server's reply code in the diagnostic (``smtp; 550 5.1.1 ...``)."""
    match = _REPLY_CODE.search(recipient.diagnostic or "")
    return int(match.group(1)) if match else None


def _suppress(recipient: RecipientReport, outcome: LateKind) -> bool:
    if outcome == "complained":
        return True
    if outcome != "bounced" or recipient.status is None:
        return False
    code = reply_code(recipient) or 550
    return is_bad_mailbox(Reply(code, f"{recipient.status} {recipient.diagnostic or ''}"))


def late_outcomes(
    parsed: ParsedReport, target: Target
) -> tuple[list[LateOutcome], list[dict[str, Any]]]:
    """The late outcomes a report gives its delivery, and each recipient's line as the
    report's record keeps it (what the report said and what it did)."""
    own = {lookup_key(a): a for a in target.recipients}
    outcomes: dict[tuple[str, str], LateOutcome] = {}
    lines: list[dict[str, Any]] = []
    recipients = list(parsed.recipients)
    if parsed.kind == "complaint" and not recipients and len(own) == 1:
        # An ARF report that names nobody (redacted): the delivery's one recipient.
        recipients = [RecipientReport(next(iter(own.values())), "complained", None, None)]
    for r in recipients:
        line: dict[str, Any] = {
            "address": r.address,
            "action": r.action,
            "status": r.status,
            "diagnostic": r.diagnostic,
            "remote_mta": r.remote_mta,
        }
        lines.append(line)
        outcome = _OUTCOME.get(r.action)
        address = own.get(lookup_key(r.address))
        if parsed.loop:
            line["effect"] = "none: a report about a report"
        elif outcome is None:
            line["effect"] = "none"
        elif address is None:
            line["effect"] = "none: not a recipient of this delivery"
        else:
            suppress = _suppress(r, outcome)
            line["effect"] = outcome + (" and suppressed" if suppress else "")
            outcomes.setdefault(
                (address, outcome),
                LateOutcome(
                    delivery_id=target.delivery_id,
                    source=target.source,
                    address=address,
                    outcome=outcome,
                    status_code=r.status,
                    diagnostic=r.diagnostic,
                    reply_code=reply_code(r),
                    suppress=suppress,
                ),
            )
    return list(outcomes.values()), lines
