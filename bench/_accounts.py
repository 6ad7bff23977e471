"""The bank-account domain the storage benchmarks write and read."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from castore_pydantic import Aggregate, Event, EventStore
from castore_pydantic.storage import EventStorageAdapter


class Opened(BaseModel):
    owner: str
    currency: str


class Moved(BaseModel):
    amount: int
    reference: str


class AccountOpened(Event):
    type: Literal["ACCOUNT_OPENED"] = "ACCOUNT_OPENED"
    payload: Opened


class MoneyMoved(Event):
    type: Literal["MONEY_MOVED"] = "MONEY_MOVED"
    payload: Moved


class Account(Aggregate):
    owner: str
    balance: int


AccountEvent = AccountOpened | MoneyMoved


def reduce_account(account: Account | None, event: AccountEvent) -> Account:
    if isinstance(event, AccountOpened):
        return Account(
            aggregate_id=event.aggregate_id,
            version=event.version,
            owner=event.payload.owner,
            balance=0,
        )
    assert account is not None
    return account.model_copy(
        update={"version": event.version, "balance": account.balance + event.payload.amount}
    )


def make_store(
    adapter: EventStorageAdapter | None, store_id: str = "ACCOUNTS"
) -> EventStore[Account, AccountEvent]:
    return EventStore(
        event_store_id=store_id,
        event_types=[AccountOpened, MoneyMoved],
        reducer=reduce_account,
        event_storage_adapter=adapter,
    )


def opened(aggregate_id: str) -> AccountOpened:
    return AccountOpened(
        aggregate_id=aggregate_id,
        version=1,
        payload=Opened(owner=f"owner {aggregate_id}", currency="EUR"),
    )


def moved(aggregate_id: str, version: int) -> MoneyMoved:
    return MoneyMoved(
        aggregate_id=aggregate_id,
        version=version,
        payload=Moved(amount=version, reference=f"ref-{version}"),
    )
