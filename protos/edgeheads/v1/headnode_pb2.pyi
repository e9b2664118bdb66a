from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "chat", "prompt_token_ids", "ignore_eos")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    chat: bool
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., chat: _Optional[bool] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("token_id", "text", "done", "finish_reason", "prompt_tokens", "prefill_seconds", "decode_seconds")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    done: bool
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., prefill_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("model", "epoch", "workers", "active_sessions", "placement_json", "phases_run", "mean_phase_seconds", "phases_per_token", "mean_phase_compute_seconds", "migrations", "migration_failures", "migrated_bytes", "max_stall_seconds", "last_migration_error", "dataflow")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_JSON_FIELD_NUMBER: _ClassVar[int]
    PHASES_RUN_FIELD_NUMBER: _ClassVar[int]
    MEAN_PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PHASES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MEAN_PHASE_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FAILURES_FIELD_NUMBER: _ClassVar[int]
    MIGRATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_MIGRATION_ERROR_FIELD_NUMBER: _ClassVar[int]
    DATAFLOW_FIELD_NUMBER: _ClassVar[int]
    model: str
    epoch: int
    workers: _containers.RepeatedScalarFieldContainer[str]
    active_sessions: int
    placement_json: str
    phases_run: int
    mean_phase_seconds: float
    phases_per_token: int
    mean_phase_compute_seconds: float
    migrations: int
    migration_failures: int
    migrated_bytes: int
    max_stall_seconds: float
    last_migration_error: str
    dataflow: str
    def __init__(self, model: _Optional[str] = ..., epoch: _Optional[int] = ..., workers: _Optional[_Iterable[str]] = ..., active_sessions: _Optional[int] = ..., placement_json: _Optional[str] = ..., phases_run: _Optional[int] = ..., mean_phase_seconds: _Optional[float] = ..., phases_per_token: _Optional[int] = ..., mean_phase_compute_seconds: _Optional[float] = ..., migrations: _Optional[int] = ..., migration_failures: _Optional[int] = ..., migrated_bytes: _Optional[int] = ..., max_stall_seconds: _Optional[float] = ..., last_migration_error: _Optional[str] = ..., dataflow: _Optional[str] = ...) -> None: ...
