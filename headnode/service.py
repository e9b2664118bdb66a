"""The Headnode gRPC servicer: Generate (tokens streamed back) and Status."""

from __future__ import annotations

import json
import logging
import uuid

import grpc

from edgeheads.headnode.cluster import ClusterError, ClusterExecutor
from edgeheads.headnode.controller_link import ControllerLink
from edgeheads.headnode.generation import agenerate_stream, encode_prompt
from edgeheads.headnode.loading import LoadedModel
from edgeheads.headnode.sampling import SamplingParams
from edgeheads.v1 import headnode_pb2, headnode_pb2_grpc

log = logging.getLogger(__name__)


class HeadnodeService(headnode_pb2_grpc.HeadnodeServicer):
    def __init__(self, model: LoadedModel, cluster: ClusterExecutor, link: ControllerLink | None = None) -> None:
        self.model = model
        self.cluster = cluster
        self.link = link

    def _prompt_ids(self, request) -> list[int]:
        if request.prompt_token_ids:
            ids = list(request.prompt_token_ids)
            vocab = self.model.parts.shape.vocab_size
            if any(not 0 <= i < vocab for i in ids):
                raise ValueError(f"prompt_token_ids must lie in [0, {vocab})")
            return ids
        if not request.prompt:
            raise ValueError("empty prompt")
        return encode_prompt(self.model.tokenizer, request.prompt, request.chat if request.HasField("chat") else None)

    async def Generate(self, request, context):
        try:
            prompt_ids = self._prompt_ids(request)
            # nothing runs past the model's context (as in the HTTP API): no room is INVALID_ARGUMENT
            positions = self.model.parts.shape.max_positions
            room = positions - len(prompt_ids)
            if room < 1 or request.max_new_tokens > room:
                asked = f" plus max_new_tokens {request.max_new_tokens}" if request.max_new_tokens else ""
                raise ValueError(f"this model's context is {positions} tokens; the prompt has {len(prompt_ids)}{asked}")
            params = SamplingParams(
                max_new_tokens=request.max_new_tokens or min(64, room), temperature=request.temperature,
                top_k=request.top_k, top_p=request.top_p or 1.0,
                seed=request.seed if request.HasField("seed") else None, stop_on_eos=not request.ignore_eos)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        session = uuid.uuid4().hex
        results = []
        log.info("session %s: %d prompt tokens, up to %d new", session, len(prompt_ids), params.max_new_tokens)
        try:
            await self.cluster.admit(session, len(prompt_ids), params.max_new_tokens)  # before anything runs
            async for event in agenerate_stream(self.cluster.step, self.model.tokenizer, prompt_ids, params,
                                                self.model.eos_token_ids, session, on_finish=results.append):
                yield headnode_pb2.GenerateEvent(token_id=event.token_id, text=event.text)
        except ClusterError as err:
            log.error("session %s failed: %s", session, err)
            if context.done():  # the client is already gone: nobody to tell
                return
            await context.abort(grpc.StatusCode[err.code], str(err))
        finally:
            await self.cluster.end_session(session)
        r = results[0]
        # the done event's text is what no token event carried (an incomplete character cut off by EOS)
        yield headnode_pb2.GenerateEvent(done=True, text=r.unstreamed_text, finish_reason=r.finish_reason,
                                         prompt_tokens=len(prompt_ids),
                                         prefill_seconds=r.prefill_seconds, decode_seconds=r.decode_seconds)

    async def Status(self, request, context):
        epoch = self.cluster.epoch
        placement = {str(b): w for b, w in sorted(epoch.placement.items())} if epoch else {}
        return headnode_pb2.StatusReply(
            model=self.model.name, epoch=epoch.number if epoch else 0,
            workers=sorted(epoch.addresses) if epoch else [], active_sessions=len(self.cluster.sessions),
            placement_json=json.dumps(placement), phases_run=self.cluster.phases_run,
            mean_phase_seconds=self.cluster.phase_seconds_total / max(1, self.cluster.phases_run),
            phases_per_token=len(epoch.plan.phases) if epoch else 0,
            mean_phase_compute_seconds=self.cluster.phase_compute_seconds_total / max(1, self.cluster.phases_run),
            dataflow=self.cluster.dataflow_name, **self._migration_status())

    def _migration_status(self) -> dict:
        if self.link is None:
            return {}
        reports, failures = self.link.reports, self.link.failures
        return dict(migrations=len(reports), migration_failures=len(failures),
                    migrated_bytes=sum(r.precopy_bytes + r.delta_bytes for r in reports),
                    max_stall_seconds=max((r.stall_seconds for r in reports), default=0.0),
                    last_migration_error=failures[-1] if failures else "")
