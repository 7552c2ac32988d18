"""Reading the command stream with a bound on the bytes one batch holds.

``XREADGROUP COUNT n`` returns n entries whatever their size: 500 entries of 16 MiB would be
8 GiB in the daemon before any check could refuse them. So the read runs as one Lua script
inside Redis, which takes entries one at a time (``XREADGROUP COUNT 1``) and measures each:

* an entry larger than ``MAIL_COMMAND_MAX_BYTES`` is never sent to the daemon; only its id
  and size come back, and the consumer records it as ``too_large`` (without its text);
* entries are returned until the next one would pass ``MAIL_CONSUMER_BATCH_MAX_BYTES``;
  that one is already in this consumer's pending list and comes back as a *deferred* id,
  fetched (with ``XRANGE``) at the start of the next batch;
* entries reclaimed from dead consumers (``XAUTOCLAIM ... JUSTID``) are fetched the same
  way, so a reclaim is bounded too.

Nothing blocks inside the script; when the stream is idle the consumer sleeps until an
XADD notification wakes it (``stream_wakeup``), or without notifications polls (every few
milliseconds, backing off to ``min(MAIL_CONSUMER_BLOCK, 50 ms)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from maildaemon.pipeline.lifecycle import RedisClient

# KEYS[1] stream; ARGV: group, consumer, max_count, budget, max_entry, reclaim_idle_ms (-1:
# no reclaim), then ids already pending for this consumer (deferred earlier).
# Returns {entries, oversize (id, size pairs), gone ids, deferred ids, reclaimed count}.
_READ_BOUNDED = """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local max_count, budget, max_entry = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local reclaim_idle = tonumber(ARGV[6])
local entries, oversize, gone, deferred = {}, {}, {}, {}
local used, taken, full = 0, 0, false
local pending, known = {}, {}
for i = 7, #ARGV do
  pending[#pending + 1] = ARGV[i]
  known[ARGV[i]] = true
end
local reclaimed = 0
if reclaim_idle >= 0 and #pending < max_count then
  local r = redis.call('XAUTOCLAIM', stream, group, consumer, reclaim_idle, '0-0',
                       'COUNT', max_count - #pending, 'JUSTID')
  for _, id in ipairs(r[2]) do
    if not known[id] then
      pending[#pending + 1] = id
      known[id] = true
      reclaimed = reclaimed + 1
    end
  end
  if r[3] then for _, id in ipairs(r[3]) do gone[#gone + 1] = id end end
end
local function take(id, fields)
  local size = 0
  for i = 1, #fields do size = size + #fields[i] end
  if size > max_entry then
    oversize[#oversize + 1] = id
    oversize[#oversize + 1] = tostring(size)
    taken = taken + 1
    return true
  end
  if #entries > 0 and used + size > budget then return false end
  used = used + size
  taken = taken + 1
  entries[#entries + 1] = {id, fields}
  return true
end
for _, id in ipairs(pending) do
  if full or taken >= max_count then
    deferred[#deferred + 1] = id
  else
    local found = redis.call('XRANGE', stream, id, id)
    if #found == 0 then
      gone[#gone + 1] = id
    elseif not take(id, found[1][2]) then
      full = true
      deferred[#deferred + 1] = id
    end
  end
end
while not full and taken < max_count do
  local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1,
                         'STREAMS', stream, '>')
  if not res then break end
  local entry = res[1][2][1]
  if not take(entry[1], entry[2]) then
    full = true
    deferred[#deferred + 1] = entry[1]
  end
end
return {entries, oversize, gone, deferred, reclaimed}
"""

Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass
class BoundedBatch:
    """One read: entries within the budget, and ids the consumer must settle otherwise."""

    entries: list[Entry] = field(default_factory=list)
    oversize: list[tuple[bytes, int]] = field(default_factory=list)  # (id, bytes)
    gone: list[bytes] = field(default_factory=list)  # pending, but no longer in the stream
    reclaimed: int = 0
    entry_bytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.entries or self.oversize or self.gone)


class BoundedReader:
    """Reads batches of at most ``max_count`` entries and ``budget`` bytes of entry data."""

    def __init__(
        self,
        redis: RedisClient,
        stream: str,
        group: str,
        consumer: str,
        *,
        max_count: int,
        budget: int,
        max_entry: int,
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._max_count = max_count
        self._budget = budget
        self._max_entry = max_entry
        self._script = redis.register_script(_READ_BOUNDED)
        self.deferred: list[bytes] = []  # in our pending list, to fetch first next time

    async def read(self, reclaim_idle_ms: int | None = None) -> BoundedBatch:
        args: list[Any] = [
            self._group,
            self._consumer,
            self._max_count,
            self._budget,
            self._max_entry,
            -1 if reclaim_idle_ms is None else reclaim_idle_ms,
            *self.deferred,
        ]
        raw = cast(list[Any], await self._script(keys=[self._stream], args=args))
        entries_raw, oversize_raw, gone, deferred, reclaimed = raw
        batch = BoundedBatch(gone=list(gone), reclaimed=int(reclaimed))
        for entry_id, flat in entries_raw:
            fields = dict(zip(flat[0::2], flat[1::2], strict=True))
            batch.entries.append((entry_id, fields))
            batch.entry_bytes += sum(len(part) for part in flat)
        batch.oversize = [
            (oversize_raw[i], int(oversize_raw[i + 1])) for i in range(0, len(oversize_raw), 2)
        ]
        self.deferred = list(deferred)
        return batch


# KEYS[1] stream; ARGV: exclusive start id ("(<id>"), entry cap, byte cap. Returns how many
# entries follow the start, counted one at a time inside Redis and stopped at either cap, so
# neither the daemon nor Redis ever holds more than one entry for the count (before Redis 7,
# XINFO GROUPS has no `lag`, and an XRANGE of the backlog would bring it all to the daemon).
_COUNT_AFTER = """
local stream, start = KEYS[1], ARGV[1]
local cap, byte_cap = tonumber(ARGV[2]), tonumber(ARGV[3])
local counted, scanned = 0, 0
while counted < cap and scanned < byte_cap do
  local found = redis.call('XRANGE', stream, start, '+', 'COUNT', 1)
  if #found == 0 then break end
  local id, fields = found[1][1], found[1][2]
  counted = counted + 1
  for i = 1, #fields do scanned = scanned + #fields[i] end
  start = '(' .. id
end
return counted
"""


class EntryCounter:
    """Counts the entries after an id, up to ``cap`` entries or ``byte_cap`` bytes read.

    The count is exact below both caps and a lower bound at either (enough for a lag
    gauge whose alert threshold lies well below the cap)."""

    def __init__(self, redis: RedisClient, stream: str, *, cap: int, byte_cap: int) -> None:
        self._stream = stream
        self._cap = cap
        self._byte_cap = byte_cap
        self._script = redis.register_script(_COUNT_AFTER)

    async def after(self, entry_id: bytes | str) -> int:
        last = entry_id if isinstance(entry_id, bytes) else entry_id.encode()
        args: list[bytes | int] = [b"(" + last, self._cap, self._byte_cap]
        return int(cast(int, await self._script(keys=[self._stream], args=args)))
