"""Bus routing benchmark: the CPU a bus consumer spends choosing and validating each body.

Run ``python -m bench.bench_routing [--messages 500] [--rounds 200]``. No broker: each
workload hands the same Castore JSON bodies (notifications of the Pokémon store, every other
one a ``POKEMON_APPEARED`` with a payload, the others ``POKEMON_CAUGHT``) to what a bus
consumer runs for each delivery before calling its listener: the listener's filter patterns,
then the channel's validation for the bodies it takes.

- ``redis``: every listener reads every body (a Redis bus listener reads the whole stream);
- ``rabbitmq``: each listener gets only the bodies its patterns match (the broker routes
  them), so its filter almost always says yes.

Columns, in microseconds per published body (summed over the workload's listeners): the
library (filter + validation); ``parse``, the channel's ``parse_message`` of just the bodies
the listeners take (validation alone, whatever the filter costs); ``filter``, their
difference (the routing CPU); ``floor``, ``json.loads`` of every body each listener reads.
``ratio`` is floor / library. Each figure is the best of ``--rounds`` runs; the three
runs take turns, so that a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable, Sequence

from bench._pokemons import STORE, notifications
from castore_pydantic.messaging import (
    FilterPattern,
    Message,
    NotificationMessage,
    NotificationMessageBus,
    matches,
)
from castore_pydantic.messaging._routing import ListenerFilter

#: The replay flag of every body: live messages.
LIVE = False

#: What a consumer runs for a body: the message its listener gets, or ``None``.
Select = Callable[[bytes, bool], Message | None]

EVERYTHING: FilterPattern = {}
BY_STORE: FilterPattern = {"event_store_id": "POKEMONS"}
BY_TYPE: FilterPattern = {"event_store_id": "POKEMONS", "event_type": "POKEMON_APPEARED"}
ELSEWHERE: FilterPattern = {"event_store_id": "OTHERS"}

#: ``(broker, workload, each listener's patterns)``.
WORKLOADS: list[tuple[str, str, list[list[FilterPattern]]]] = [
    ("redis", "everything", [[EVERYTHING]]),
    ("redis", "by store", [[BY_STORE]]),
    ("redis", "by type", [[BY_TYPE]]),
    ("redis", "elsewhere", [[ELSEWHERE]]),
    ("redis", "4 listeners", [[EVERYTHING], [BY_STORE], [BY_TYPE], [ELSEWHERE]]),
    ("rabbitmq", "everything", [[EVERYTHING]]),
    ("rabbitmq", "by store", [[BY_STORE]]),
    ("rabbitmq", "by type", [[BY_TYPE]]),
]


def selector(patterns: Sequence[FilterPattern], bus: NotificationMessageBus, broker: str) -> Select:
    """What the broker's consumer runs for each body it reads for one listener."""
    listener = ListenerFilter(patterns)
    routed = broker == "rabbitmq"  # its bindings deliver what the patterns match
    return lambda body, replay: listener.select(body, replay, bus, routed=routed)


def best_of(rounds: int, runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """The shortest of ``rounds`` runs of each, in seconds; the runs take turns."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            gc.collect()
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure(
    broker: str,
    listeners: list[list[FilterPattern]],
    messages: list[NotificationMessage],
    rounds: int,
) -> dict[str, float]:
    """Microseconds per published body: library, parse, filter and floor."""
    bus = NotificationMessageBus(message_bus_id="bench", source_event_stores=[STORE])
    bodies = [message.model_dump_json().encode() for message in messages]
    feeds: list[tuple[Select, list[bytes], list[bytes]]] = []
    for patterns in listeners:
        taken = [
            body
            for body, message in zip(bodies, messages, strict=True)
            if any(matches(pattern, message, replay=False) for pattern in patterns)
        ]
        # A RabbitMQ listener reads what its bindings route to it; a Redis one, everything.
        read = taken if broker == "rabbitmq" else bodies
        feeds.append((selector(patterns, bus, broker), read, taken))
    for select, read, taken in feeds:
        assert [body for body in read if select(body, LIVE) is not None] == taken

    def library() -> None:
        for select, read, _ in feeds:
            for body in read:
                select(body, LIVE)

    def parse() -> None:
        parse_message = bus.parse_message
        for _, _, taken in feeds:
            for body in taken:
                parse_message(body)

    def floor() -> None:
        loads = json.loads
        for _, read, _ in feeds:
            for body in read:
                loads(body)

    runs = {"library": library, "parse": parse, "floor": floor}
    for run in runs.values():  # warm up: validators, caches
        run()
    per_body = 1e6 / len(bodies)
    result = {name: seconds * per_body for name, seconds in best_of(rounds, runs).items()}
    result["filter"] = result["library"] - result["parse"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    messages = notifications(args.messages)
    print(f"{args.messages} notification bodies, best of {args.rounds}; us per body")
    print(
        f"{'broker':<10}{'workload':<14}{'library':>9}{'parse':>9}{'filter':>9}{'floor':>9}"
        f"{'ratio':>8}"
    )
    for broker, name, listeners in WORKLOADS:
        result = measure(broker, listeners, messages, args.rounds)
        print(
            f"{broker:<10}{name:<14}{result['library']:>9.2f}{result['parse']:>9.2f}"
            f"{result['filter']:>9.2f}{result['floor']:>9.2f}"
            f"{result['floor'] / result['library']:>8.2f}"
        )


if __name__ == "__main__":
    main()
