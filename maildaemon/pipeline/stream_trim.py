"""Stream trimmer: keeps the command stream to what is not yet durable in PostgreSQL.

An entry is acknowledged (XACK) only after its delivery, idempotency hit or malformed
record is committed, so an entry that is still *pending* in a consumer group, or not yet
delivered to it, is not yet durable; everything older is. Every
``MAIL_COMMAND_STREAM_TRIM_INTERVAL`` one Lua script, atomic inside Redis, computes the
*floor* of the stream -- over every consumer group on it, the oldest pending entry
(``XPENDING`` summary) or, with nothing pending, the group's ``last-delivered-id`` -- and
runs ``XTRIM <stream> MINID <floor>``: only entries older than the floor go. The entry at
the floor, every pending entry (whoever holds it; a reclaim moves an entry between
consumers, never out of the pending list) and every undelivered entry stay. A stream
without any group is never trimmed (a group recreated from ``0`` reads it all).

Because the whole computation and the trim are one script, replicas may run it at the
same time and a replica killed mid-trim leaves nothing half done. Each call removes at most
``TRIM_STEP`` entries (whole stream nodes first, ``MINID ~ ... LIMIT``, then the few left
in the node at the floor), so a first trim of a long stream never blocks Redis for long:
the trimmer calls again until the floor is reached. After a pass it refreshes the stream's
length and memory gauges (``XLEN``, ``MEMORY USAGE`` where the server allows it). The
first trim comes one interval after the start (a restart is no reason to trim at once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import ResponseError

from maildaemon.config import Settings
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import Periodic, RedisClient
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.trim")
TRIM_STEP = 10_000  # entries one script call may remove at most

# KEYS[1] stream; ARGV[1] the most entries to remove (about). Returns {removed, floor or
# false, groups, done}: floor false when the stream has no group (or does not exist):
# nothing removed. Whole nodes go first (``~ LIMIT``); once that removes less than half a
# step it has reached the node holding the floor, and an exact trim removes the rest of
# that node (done = 1); otherwise the caller calls again.
# Ids are compared as the decimal strings Redis writes (no float precision is involved).
_TRIM = """
local stream, step = KEYS[1], tonumber(ARGV[1])
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms, seq
end
local function num_less(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end
local function less(a, b)
  local am, as = parts(a)
  local bm, bs = parts(b)
  if am ~= bm then return num_less(am, bm) end
  return num_less(as, bs)
end
if redis.call('EXISTS', stream) == 0 then return {0, false, 0, 1} end
local groups = redis.call('XINFO', 'GROUPS', stream)
if #groups == 0 then return {0, false, 0, 1} end
local floor = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local bound = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then
    local summary = redis.call('XPENDING', stream, info['name'])
    if summary[2] and less(summary[2], bound) then bound = summary[2] end
  end
  if floor == nil or less(bound, floor) then floor = bound end
end
local removed = redis.call('XTRIM', stream, 'MINID', '~', floor, 'LIMIT', step)
if removed * 2 >= step then return {removed, floor, #groups, 0} end
removed = removed + redis.call('XTRIM', stream, 'MINID', floor)
return {removed, floor, #groups, 1}
"""


@dataclass(frozen=True)
class TrimResult:
    """One trim call: entries removed, the floor kept (None: no group, nothing trimmed),
    the groups on the stream, and whether the floor was reached (else: call again)."""

    removed: int
    floor: str | None
    groups: int
    done: bool = True


class StreamTrim:
    """The trim script bound to one stream."""

    def __init__(self, redis: RedisClient, stream: str) -> None:
        self._stream = stream
        self._script = redis.register_script(_TRIM)

    async def once(self, step: int = TRIM_STEP) -> TrimResult:
        raw = cast(list[Any], await self._script(keys=[self._stream], args=[step]))
        removed, floor, groups, done = raw
        text = floor.decode() if isinstance(floor, bytes) else (floor or None)
        return TrimResult(int(removed), text, int(groups), bool(done))


class StreamTrimmer(Periodic):
    """Trims the command stream every interval, and observes its length and memory."""

    component = "stream-trim"

    def __init__(self, settings: Settings, redis: RedisClient, instruments: Instruments) -> None:
        super().__init__(log, instruments, settings.command_stream_trim_interval)
        self._s = settings
        self._redis = redis
        self._trim = StreamTrim(redis, settings.command_stream)
        self._memory_refused = False
        self._first = True

    def started(self) -> None:
        event(
            log,
            "stream trimmer started",
            stream=self._s.command_stream,
            interval_s=self.interval,
        )

    async def tick(self) -> float:
        if self.interval <= 0:  # MAIL_COMMAND_STREAM_TRIM_INTERVAL=0: never trims
            await self._stopping.wait()
            return 0.0
        if self._first:  # the first trim one interval after the start: only the gauges now
            self._first = False
            await self._observe()
            return self.interval
        await self.run_once()
        return self.interval

    def stopped(self) -> None:
        event(log, "stream trimmer stopped")

    async def run_once(self) -> int:
        """Trim down to the floor (in steps); returns how many entries went."""
        total = 0
        result = TrimResult(0, None, 0)
        while not self.stopping:
            result = await self._trim.once()
            total += result.removed
            if result.done:
                break
        await self._observe()
        if total:
            self._inst.stream_trimmed.add(total)
            event(
                log,
                "command stream trimmed",
                stream=self._s.command_stream,
                trimmed=total,
                min_id=result.floor,
                groups=result.groups,
                length=self._inst.command_stream_length,
            )
        return total

    async def _observe(self) -> None:
        stream = self._s.command_stream
        self._inst.command_stream_length = int(await self._redis.xlen(stream))
        if self._memory_refused:
            return
        try:
            usage = await self._redis.memory_usage(stream)
        except ResponseError:  # MEMORY disabled or renamed (managed Redis): length alone
            self._memory_refused = True
            self._inst.command_stream_memory = -1
            return
        self._inst.command_stream_memory = int(usage or 0)
