"""The head node's admission driver: the ledger of headnode/admission.py, fed with the
placement in use and the workers' memory budgets, which it asks the workers for
(GetTelemetry: memory_available_bytes and memory_used_bytes).

- ``admit`` reserves a new session's tokens, or refuses it (SessionLimitError,
  AdmissionError: RESOURCE_EXHAUSTED) before its first step. Budgets younger than
  BUDGET_MAX_AGE_SECONDS are reused; a refusal is only given on budgets asked for afresh.
- ``release`` is called however a session ends (ClusterExecutor.end_session).
- ``evict`` runs after a recovery moved blocks onto fewer workers: the sessions that no
  longer fit are ended with RESOURCE_EXHAUSTED instead of overcommitting the survivors.
- ``placement_refusal`` says why a migration's target placement cannot hold the live
  sessions' reservations (the migration is then abandoned and the old epoch stays).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping

import grpc

from edgeheads.common.spec import BlockId, BlockKind
from edgeheads.headnode.admission import AdmissionError, Ledger, ModelCost, SessionLimitError, WorkerBudget, mib
from edgeheads.headnode.metrics import HeadnodeMetrics
from edgeheads.headnode.slicing import ModelParts
from edgeheads.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

BUDGET_MAX_AGE_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 5.0


def block_weight_bytes(parts: ModelParts) -> dict[BlockId, int]:
    """Bytes of each block's weights as a worker counts them (Block.weight_bytes: RoPE
    constants are not weights)."""
    return {b: sum(t.numel() * t.element_size() for n, t in tensors.items() if not n.startswith("rope."))
            for b, tensors in parts.blocks.items()}


def cache_row_bytes(parts: ModelParts) -> int:
    """One K and one V row of one attention block's cache: 2 * head_dim * element size (the
    blocks' dtype, which the workers' caches take)."""
    qkv = next(t["qkv.weight"] for t in parts.blocks.values() if "qkv.weight" in t)
    return 2 * parts.shape.head_dim * qkv.element_size()


class Admission:
    def __init__(self, parts: ModelParts, stubs: Mapping[str, worker_pb2_grpc.WorkerStub],
                 max_sessions: int | None = None, metrics: HeadnodeMetrics | None = None) -> None:
        self.ledger = Ledger(max_sessions)
        self.stubs = stubs  # the cluster's: it adds workers as they appear
        self.metrics = metrics
        self.weights = block_weight_bytes(parts)
        self.row_bytes = cache_row_bytes(parts)
        self.max_positions = parts.shape.max_positions  # no session runs past it (HeadNodeCompute.embed)
        self.budgets: dict[str, WorkerBudget] = {}
        self._asked: dict[str, float] = {}  # worker -> loop time its budget was read

    # ------------------------------------------------------------------ reading
    def tokens(self, session: str) -> int:
        """The tokens ``session`` reserved (0: none; its caches then grow as needed)."""
        return self.ledger.tokens.get(session, 0)

    def cost(self, placement: Mapping[BlockId, str]) -> ModelCost:
        return ModelCost.of(placement, self.weights, self.row_bytes)

    def cache_bytes(self, blocks: Iterable[BlockId]) -> int:
        """Bytes of K/V caches the admitted sessions' reservations take in ``blocks`` (at most
        what their caches hold now)."""
        attention = sum(1 for b in blocks if b.kind is BlockKind.ATTENTION)
        return attention * self.ledger.reserved_tokens * self.row_bytes

    def reserved_bytes(self, placement: Mapping[BlockId, str]) -> dict[str, int]:
        """worker -> bytes of K/V caches the admitted sessions hold there under ``placement``."""
        return self.cost(placement).kv_bytes(self.ledger.reserved_tokens)

    async def refresh(self, workers: Iterable[str], max_age_seconds: float = 0.0) -> None:
        """Ask the workers whose budget is older than ``max_age_seconds`` for it. A worker
        that does not answer keeps the budget it had (or has none: it is not checked; its
        own guard refuses what does not fit, see worker/cache_guard.py)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        stale = sorted(w for w in set(workers) if now - self._asked.get(w, -1e18) > max_age_seconds)

        async def one(worker: str) -> worker_pb2.WorkerTelemetry | None:
            stub = self.stubs.get(worker)
            if stub is None:
                return None
            try:
                return await stub.GetTelemetry(worker_pb2.TelemetryRequest(), timeout=PROBE_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as err:
                log.warning("admission: %s did not report its memory (%s); using %s", worker, err.code().name,
                            "its last report" if worker in self.budgets else "no budget for it")
                return None
        for worker, reply in zip(stale, await asyncio.gather(*[one(w) for w in stale])):
            if reply is not None:
                self.budgets[worker] = WorkerBudget(reply.memory_available_bytes, reply.memory_used_bytes)
                self._asked[worker] = now

    def _budgets(self, placement: Mapping[BlockId, str]) -> dict[str, WorkerBudget]:
        workers = set(placement.values())
        return {w: b for w, b in self.budgets.items() if w in workers}

    # ------------------------------------------------------------------ sessions
    async def admit(self, session: str, prompt_tokens: int, max_new_tokens: int,
                    placement: Mapping[BlockId, str]) -> int:
        """Reserve the session's tokens under ``placement`` (the epoch in use): the prompt and
        ``max_new_tokens``, but no more than the model's context holds; the tokens reserved.
        Raises SessionLimitError or AdmissionError, having reserved nothing."""
        ledger = self.ledger
        max_new_tokens = max(0, min(max_new_tokens, self.max_positions - prompt_tokens))
        try:
            ledger.check_limit()  # before asking the workers anything
            await self.refresh(placement.values(), BUDGET_MAX_AGE_SECONDS)
            try:
                tokens = ledger.admit(session, prompt_tokens, max_new_tokens, self.cost(placement),
                                      self._budgets(placement))
            except AdmissionError as err:
                if isinstance(err, SessionLimitError):
                    raise
                await self.refresh(placement.values())  # refuse only on fresh figures
                tokens = ledger.admit(session, prompt_tokens, max_new_tokens, self.cost(placement),
                                      self._budgets(placement))
        except AdmissionError as err:
            reason = "sessions" if isinstance(err, SessionLimitError) else "memory"
            log.warning("refused a request of %d + %d tokens: %s", prompt_tokens, max_new_tokens, err)
            if self.metrics is not None:
                self.metrics.admission_refusals.labels(reason).inc()
            raise
        log.info("session %s: reserved %d tokens of K/V cache (%s over %d workers); %d sessions admitted", session,
                 tokens, mib(sum(self.cost(placement).kv_bytes(tokens).values())), len(set(placement.values())),
                 len(ledger))
        self._gauges(placement)
        return tokens

    def release(self, session: str, placement: Mapping[BlockId, str] | None = None) -> None:
        if self.ledger.release(session) and placement is not None:
            self._gauges(placement)

    async def evict(self, placement: Mapping[BlockId, str], why: str) -> dict[str, AdmissionError]:
        """Release the sessions whose reservations no longer fit ``placement`` (newest first
        to go); session -> the error that ends it."""
        await self.refresh(placement.values())
        cost = self.cost(placement)
        gone = self.ledger.over(cost, self._budgets(placement))
        out = {}
        for session in gone:
            tokens = self.ledger.release(session)
            out[session] = AdmissionError(
                f"{why}: the remaining workers cannot hold the K/V caches of this session ({tokens} tokens "
                f"reserved) next to the {len(self.ledger)} sessions admitted before it")
        if gone:
            log.error("%s: %d sessions no longer fit and end (%d stay)", why, len(gone), len(self.ledger))
            if self.metrics is not None:
                self.metrics.admission_refusals.labels("evicted").inc(len(gone))
        self._gauges(placement)
        return out

    async def placement_refusal(self, placement: Mapping[BlockId, str], refresh: bool = True) -> str | None:
        """Why ``placement`` cannot hold its weights and the live sessions' reservations, or
        None when it can. ``refresh`` False: on the budgets last read (no RPC)."""
        if refresh:
            await self.refresh(placement.values())
        missing = self.ledger.placement_shortfalls(self.cost(placement), self._budgets(placement))
        if not missing:
            return None
        return ("it cannot hold the K/V caches reserved by the " + str(len(self.ledger)) + " live sessions: "
                + "; ".join(f"{s.worker} would need {mib(s.need)} for them and has {mib(max(0, s.room))} "
                            "next to its blocks" for s in missing))

    def _gauges(self, placement: Mapping[BlockId, str]) -> None:
        if self.metrics is None:
            return
        self.metrics.admitted_sessions.set(len(self.ledger))
        for worker, held in self.reserved_bytes(placement).items():
            self.metrics.reserved_kv_bytes.labels(worker).set(held)
