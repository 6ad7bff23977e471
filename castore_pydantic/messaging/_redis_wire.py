"""What the Redis adapters put on the wire: entries, scripts, safe URLs.

A stream entry holds Castore's JSON message in its ``body`` field, the replay flag in
``replay`` (``"0"`` / ``"1"``) and, for a retry, the attempt number in ``attempt``.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "APPEND_MESSAGES",
    "CLAIM_NEXT",
    "DEAD_LETTER",
    "MOVE_DEAD_LETTERS",
    "PROMOTE_RETRIES",
    "PURGE_KEYS",
    "REJOIN_GROUP",
    "SCHEDULE_RETRY",
    "positive",
    "redact",
]

#: Appends messages to a stream in one atomic step (a pipeline of XADDs costs a reply each).
#: KEYS: the stream. ARGV: replay flag, max length ("" for none), the bodies.
APPEND_MESSAGES = """
local replay, max_length = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  if max_length == '' then
    redis.call('XADD', KEYS[1], '*', 'body', ARGV[i], 'replay', replay)
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', max_length, '*', 'body', ARGV[i], 'replay', replay)
  end
end
return #ARGV - 2
"""


#: Moves dead letters back for handling, each at most once: a letter is added to the retry
#: stream only by the call whose XDEL removed it (two calls at once never double one).
#: KEYS: the dead-letter stream, the retry stream. ARGV: per letter, its id, body, replay.
MOVE_DEAD_LETTERS = """
local moved = 0
for i = 1, #ARGV, 3 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[2], '*', 'body', ARGV[i + 1], 'replay', ARGV[i + 2], 'attempt', '1')
    moved = moved + 1
  end
end
return moved
"""

#: Atomically: acknowledge (and drop) the failed entry, then schedule its retry copy. An
#: entry the group no longer holds as pending (XACK counts 0) gets no retry: the channel was
#: purged, or another consumer took the entry over and has settled it already.
#: KEYS: delayed set, stream of the entry. ARGV: group, entry id, delay ms, member, "1" to XDEL.
#: Returns when the retry is due (ms), or false when none was scheduled.
SCHEDULE_RETRY = """
if redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]) == 0 then return false end
if ARGV[5] == '1' then redis.call('XDEL', KEYS[2], ARGV[2]) end
local now = redis.call('TIME')
local due = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], due, ARGV[4])
return due
"""

#: Atomically: acknowledge (and drop) an entry given up on, then add its dead letter; none
#: for an entry the group no longer holds as pending (as in ``SCHEDULE_RETRY``).
#: KEYS: dead-letter stream, stream of the entry. ARGV: group, entry id, "1" to XDEL, then
#: the letter's field and value pairs.
#: Returns 1 when the letter was added, else 0.
DEAD_LETTER = """
if redis.call('XACK', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
if ARGV[3] == '1' then redis.call('XDEL', KEYS[2], ARGV[2]) end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
return 1
"""

#: Atomically move due retries from the delayed set to the stream they are read from.
#: KEYS: delayed set, target stream. ARGV: how many at most.
#: Returns ``{moved, ms until the next retry is due or -1}``.
PROMOTE_RETRIES = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
local moved = 0
for _, member in ipairs(due) do
  local attempt, replay, body = string.match(member, '^(%d+) ([01]) %S+ (.*)$')
  if attempt then
    redis.call('XADD', KEYS[2], '*', 'body', body, 'replay', replay, 'attempt', attempt)
    redis.call('ZREM', KEYS[1], member)
    moved = moved + 1
  end
end
local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if head[2] then return {moved, math.max(0, tonumber(head[2]) - now_ms)} end
return {moved, -1}
"""

#: Atomically acknowledge the entries handled since the last call (and delete them from a
#: stream the group owns), then claim, for this consumer, the first pending entry after a
#: cursor that has been idle long enough (of one consumer only, when given), and set its
#: delivery count. One round trip per entry taken over.
#: KEYS: stream. ARGV: group, consumer, min idle ms, owner ('' for any), "1" to count this
#: delivery ("0" keeps the count), "1" to XDEL what is acknowledged, cursor (exclusive), then
#: the ids to acknowledge.
#: Returns false when there is none, else ``{id, delivery count, fields}``; the fields are
#: missing when the entry was deleted from the stream (trimmed).
CLAIM_NEXT = """
for i = 8, #ARGV do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  if ARGV[6] == '1' then redis.call('XDEL', KEYS[1], ARGV[i]) end
end
local xpending = {'XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '(' .. ARGV[7], '+', 1}
if ARGV[4] ~= '' then table.insert(xpending, ARGV[4]) end
local rows = redis.call(unpack(xpending))
if #rows == 0 then return false end
local id = rows[1][1]
local count = rows[1][4] + tonumber(ARGV[5])
local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'RETRYCOUNT', count)
if claimed[1] and claimed[1][2] then return {id, count, claimed[1][2]} end
return {id, count}
"""

#: Deletes a channel's keys and, in the same atomic step, creates consumer groups again on
#: the empty streams: a consumer blocked reading one of them stays blocked (Redis unblocks
#: it with an error only if its group is missing once the script has run) and gets what is
#: published next. The keys are listed by the script itself: one created by a retry or a
#: dead letter while a client listed them would outlive the purge.
#: KEYS: the channel's stream, then the stream of each group to create. ARGV: the pattern of
#: the channel's other keys, then the name of each group to create.
#: Returns how many keys were deleted.
PURGE_KEYS = """
local deleted = redis.call('UNLINK', KEYS[1])
local cursor = '0'
repeat
  local reply = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = reply[1]
  if #reply[2] > 0 then deleted = deleted + redis.call('UNLINK', unpack(reply[2])) end
until cursor == '0'
for i = 2, #KEYS do
  local made = redis.pcall('XGROUP', 'CREATE', KEYS[i], ARGV[i], '0', 'MKSTREAM')
  if type(made) == 'table' and made.err and not string.find(made.err, 'BUSYGROUP') then
    return redis.error_reply(made.err)
  end
end
return deleted
"""

#: Creates a consumer group that has disappeared again: after the entry it had delivered up
#: to, if the stream still holds that very entry (only the group was deleted), else at the
#: stream's start (the stream was deleted too: all it holds was published since).
#: KEYS: the stream. ARGV: group, the id of the last entry the group delivered ('0': none).
#: Returns where the group starts (unchanged when it exists already).
REJOIN_GROUP = """
local start = '0'
if ARGV[2] ~= '0' and #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) > 0 then
  start = ARGV[2]
end
local made = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], start, 'MKSTREAM')
if type(made) == 'table' and made.err and not string.find(made.err, 'BUSYGROUP') then
  return redis.error_reply(made.err)
end
return start
"""


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def positive(name: str, value: object) -> int:
    """Check an option that must be a positive integer.

    Raises:
        ValueError: It is not (the message names the option).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
