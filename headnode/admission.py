"""Admission: a session reserves the K/V memory of its whole generation before it starts.

A session of ``prompt + max_new_tokens`` tokens holds, on every worker, one cache per
attention block there, each ``tokens`` rows of a K and a V of ``head_dim`` numbers
(worker/blocks/kv_cache.py; a worker allocates exactly the reservation, see
``store_capacity``). Every session runs through every block, so a worker holding ``n``
attention blocks commits ``n * row_bytes`` per reserved token, and what the live sessions
hold there is that times the sum of their reservations.

A worker may give its blocks and caches ``available`` bytes in total (its memory limit,
cgroup headroom or the memory the OS has: WorkerTelemetry.memory_available_bytes). Its
room for a new reservation is ``available`` less what is committed: the weights of the
blocks placed there plus the reservations, or what it reports in use when that is more
(caches the ledger does not know of, such as a dead head node's orphans).

This module is the arithmetic and the ledger, pure: no gRPC, no clocks. The head node's
driver (headnode/admission_control.py) feeds it the placement and the workers' budgets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edgeheads.common.spec import BlockId, BlockKind
from edgeheads.headnode.cluster_errors import CapacityError


class AdmissionError(CapacityError):
    """A request does not fit the workers' memory now (RESOURCE_EXHAUSTED): refused before it
    started, or a live session that no longer fits after a worker was lost."""


class SessionLimitError(AdmissionError):
    """As many sessions as ``headnode.max_sessions`` allows are running."""


@dataclass(frozen=True)
class WorkerBudget:
    """A worker's memory as it reports it (WorkerTelemetry)."""

    available: int  # bytes blocks and caches may use in total
    used: int  # bytes blocks and caches use now


@dataclass(frozen=True)
class ModelCost:
    """What placing the model costs each worker, for one placement."""

    attention: dict[str, int]  # worker -> attention blocks it holds
    weights: dict[str, int]  # worker -> bytes of the weights placed there
    row_bytes: int  # one K and one V row of one attention block: 2 * head_dim * element size

    @classmethod
    def of(cls, placement: Mapping[BlockId, str], block_weight_bytes: Mapping[BlockId, int],
           row_bytes: int) -> ModelCost:
        attention: dict[str, int] = {}
        weights: dict[str, int] = {}
        for block, worker in placement.items():
            weights[worker] = weights.get(worker, 0) + block_weight_bytes[block]
            attention.setdefault(worker, 0)
            if block.kind is BlockKind.ATTENTION:
                attention[worker] += 1
        return cls(attention, weights, row_bytes)

    def kv_bytes(self, tokens: int) -> dict[str, int]:
        """worker -> bytes of K/V caches a reservation of ``tokens`` takes there."""
        return {w: n * tokens * self.row_bytes for w, n in self.attention.items()}

    def room(self, budgets: Mapping[str, WorkerBudget], reserved_tokens: int) -> dict[str, int]:
        """worker -> bytes a new reservation may take there, given ``reserved_tokens`` already
        reserved (negative when over budget). Workers without a known budget are left out."""
        committed = self.kv_bytes(reserved_tokens)
        return {w: b.available - max(self.weights[w] + committed[w], b.used)
                for w, b in budgets.items() if w in self.weights}

    def tokens_that_fit(self, room: Mapping[str, int]) -> int | None:
        """The most tokens one reservation may have within ``room``; None when no worker with
        attention blocks has a known budget."""
        fits = [max(0, room[w]) // (n * self.row_bytes) for w, n in self.attention.items() if n and w in room]
        return min(fits) if fits else None


@dataclass(frozen=True)
class Shortfall:
    worker: str
    need: int  # bytes the reservation takes there
    room: int  # bytes free for it


def shortfalls(need: Mapping[str, int], room: Mapping[str, int]) -> list[Shortfall]:
    """The workers where ``need`` exceeds ``room`` (a worker with no known room is not checked)."""
    return [Shortfall(w, need[w], room[w]) for w in sorted(need) if w in room and need[w] > room[w]]


def mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def refusal_message(tokens: int, prompt_tokens: int, cost: ModelCost, budgets: Mapping[str, WorkerBudget],
                    missing: list[Shortfall], others: int, reserved_tokens: int) -> str:
    """Why a request was refused: what did not fit where, and what would."""
    where = "; ".join(f"{mib(s.need)} on {s.worker} ({cost.attention[s.worker]} attention blocks), which has "
                      f"{mib(max(0, s.room))} free (budget {mib(budgets[s.worker].available)}: weights "
                      f"{mib(cost.weights[s.worker])}, {mib(budgets[s.worker].used)} in use)" for s in missing)
    now = cost.tokens_that_fit(cost.room(budgets, reserved_tokens)) or 0
    alone = cost.tokens_that_fit(cost.room(unused(budgets), 0)) or 0
    held = (f"{others} running session{' holds' if others == 1 else 's hold'} {reserved_tokens} tokens"
            if others else "no other session is running")
    hint = (f"at most {now} tokens fit now, {alone} with no other session running" if others else
            f"at most {now} tokens fit")
    return (f"not enough memory for this request's K/V caches: {tokens} tokens (prompt {prompt_tokens} + "
            f"max_new_tokens {tokens - prompt_tokens}) take {where}; {held}; {hint}")


class Ledger:
    """The sessions admitted and the tokens each reserved, in admission order."""

    def __init__(self, max_sessions: int | None = None) -> None:
        self.max_sessions = max_sessions
        self.tokens: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, session: object) -> bool:
        return session in self.tokens

    @property
    def reserved_tokens(self) -> int:
        return sum(self.tokens.values())

    def check_limit(self) -> None:
        """SessionLimitError when as many sessions run as ``max_sessions`` allows."""
        if self.max_sessions is not None and len(self.tokens) >= self.max_sessions:
            raise SessionLimitError(f"{len(self.tokens)} sessions are running, as many as this head node "
                                    f"allows at once (headnode.max_sessions); try again when one ends")

    def admit(self, session: str, prompt_tokens: int, max_new_tokens: int, cost: ModelCost,
              budgets: Mapping[str, WorkerBudget]) -> int:
        """Reserve ``prompt_tokens + max_new_tokens`` for ``session``; the tokens reserved.
        SessionLimitError or AdmissionError when it does not fit (nothing is reserved then)."""
        if session in self.tokens:
            raise ValueError(f"session {session} is admitted already")
        self.check_limit()
        tokens = prompt_tokens + max_new_tokens
        missing = shortfalls(cost.kv_bytes(tokens), cost.room(budgets, self.reserved_tokens))
        if missing:
            raise AdmissionError(refusal_message(tokens, prompt_tokens, cost, budgets, missing, len(self.tokens),
                                                 self.reserved_tokens))
        self.tokens[session] = tokens
        return tokens

    def release(self, session: str) -> int:
        """Forget ``session``'s reservation (a no-op when it has none); the tokens it held."""
        return self.tokens.pop(session, 0)

    def over(self, cost: ModelCost, budgets: Mapping[str, WorkerBudget]) -> list[str]:
        """The sessions that do not fit ``cost`` (a new placement) in admission order: each
        is kept if it fits next to those kept before it. What the workers report in use is
        not counted (the caches are rebuilt under the new placement)."""
        fresh = unused(budgets)
        kept = 0
        out = []
        for session, tokens in self.tokens.items():
            if shortfalls(cost.kv_bytes(tokens), cost.room(fresh, kept)):
                out.append(session)
            else:
                kept += tokens
        return out

    def placement_shortfalls(self, cost: ModelCost, budgets: Mapping[str, WorkerBudget]) -> list[Shortfall]:
        """Where ``cost`` (a placement to migrate to) cannot hold its weights and every live
        session's reservation within the workers' budgets."""
        return shortfalls(cost.kv_bytes(self.reserved_tokens), cost.room(unused(budgets), 0))


def unused(budgets: Mapping[str, WorkerBudget]) -> dict[str, WorkerBudget]:
    """The budgets as if nothing were held: for a placement whose blocks and caches replace
    what the workers hold now."""
    return {w: WorkerBudget(b.available, 0) for w, b in budgets.items()}
