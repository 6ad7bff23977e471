"""What the Redis adapters put on the wire: entries, scripts, safe URLs.

A stream entry holds Castore's JSON message in its ``body`` field, the replay flag in
``replay`` (``"0"`` / ``"1"``) and, for a retry, the attempt number in ``attempt``.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["APPEND_MESSAGES", "MOVE_DEAD_LETTERS", "positive", "redact"]

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
