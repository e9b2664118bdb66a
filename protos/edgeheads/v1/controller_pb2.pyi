from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Throttling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THROTTLING_UNKNOWN: _ClassVar[Throttling]
    THROTTLING_NONE: _ClassVar[Throttling]
    THROTTLING_ACTIVE: _ClassVar[Throttling]
THROTTLING_UNKNOWN: Throttling
THROTTLING_NONE: Throttling
THROTTLING_ACTIVE: Throttling

class ControllerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlanDecision(_message.Message):
    __slots__ = ("epoch", "unix_time", "reason", "policy", "blocks_moved", "blocks_per_worker", "predicted_token_seconds", "calibrated")
    class BlocksPerWorkerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_MOVED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_PER_WORKER_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    unix_time: float
    reason: str
    policy: str
    blocks_moved: int
    blocks_per_worker: _containers.ScalarMap[str, int]
    predicted_token_seconds: float
    calibrated: bool
    def __init__(self, epoch: _Optional[int] = ..., unix_time: _Optional[float] = ..., reason: _Optional[str] = ..., policy: _Optional[str] = ..., blocks_moved: _Optional[int] = ..., blocks_per_worker: _Optional[_Mapping[str, int]] = ..., predicted_token_seconds: _Optional[float] = ..., calibrated: _Optional[bool] = ...) -> None: ...

class CostCalibration(_message.Message):
    __slots__ = ("hop_seconds", "head_seconds", "kind_factors", "observations")
    class KindFactorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    HOP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    KIND_FACTORS_FIELD_NUMBER: _ClassVar[int]
    OBSERVATIONS_FIELD_NUMBER: _ClassVar[int]
    hop_seconds: float
    head_seconds: float
    kind_factors: _containers.ScalarMap[str, float]
    observations: int
    def __init__(self, hop_seconds: _Optional[float] = ..., head_seconds: _Optional[float] = ..., kind_factors: _Optional[_Mapping[str, float]] = ..., observations: _Optional[int] = ...) -> None: ...

class ControllerStatusReply(_message.Message):
    __slots__ = ("model", "policy", "epoch", "error", "workers", "decisions", "tokens_since_plan", "replan_every_tokens", "calibration", "current_predicted_token_seconds", "running_epoch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SINCE_PLAN_FIELD_NUMBER: _ClassVar[int]
    REPLAN_EVERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_PREDICTED_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_EPOCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    policy: str
    epoch: int
    error: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    decisions: _containers.RepeatedCompositeFieldContainer[PlanDecision]
    tokens_since_plan: int
    replan_every_tokens: int
    calibration: CostCalibration
    current_predicted_token_seconds: float
    running_epoch: int
    def __init__(self, model: _Optional[str] = ..., policy: _Optional[str] = ..., epoch: _Optional[int] = ..., error: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., decisions: _Optional[_Iterable[_Union[PlanDecision, _Mapping]]] = ..., tokens_since_plan: _Optional[int] = ..., replan_every_tokens: _Optional[int] = ..., calibration: _Optional[_Union[CostCalibration, _Mapping]] = ..., current_predicted_token_seconds: _Optional[float] = ..., running_epoch: _Optional[int] = ...) -> None: ...

class ProgressReport(_message.Message):
    __slots__ = ("tokens", "step_seconds", "epoch", "dataflow_seconds", "head_seconds", "context_tokens")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DATAFLOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    step_seconds: float
    epoch: int
    dataflow_seconds: float
    head_seconds: float
    context_tokens: int
    def __init__(self, tokens: _Optional[int] = ..., step_seconds: _Optional[float] = ..., epoch: _Optional[int] = ..., dataflow_seconds: _Optional[float] = ..., head_seconds: _Optional[float] = ..., context_tokens: _Optional[int] = ...) -> None: ...

class ProgressAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "address", "memory_available_bytes", "compute_flops", "device", "memory_limit_bytes", "memory_limit_source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    memory_available_bytes: int
    compute_flops: float
    device: str
    memory_limit_bytes: int
    memory_limit_source: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., memory_available_bytes: _Optional[int] = ..., compute_flops: _Optional[float] = ..., device: _Optional[str] = ..., memory_limit_bytes: _Optional[int] = ..., memory_limit_source: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("name", "heartbeat_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    heartbeat_seconds: float
    def __init__(self, name: _Optional[str] = ..., heartbeat_seconds: _Optional[float] = ...) -> None: ...

class TelemetryReport(_message.Message):
    __slots__ = ("name", "memory_available_bytes", "memory_used_bytes", "compute_flops", "cpu_percent", "load_1m", "temperature_celsius", "throttling", "links", "memory_limit_bytes", "memory_limit_source", "kind_rates", "cpu_available_fraction")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LOAD_1M_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    THROTTLING_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    KIND_RATES_FIELD_NUMBER: _ClassVar[int]
    CPU_AVAILABLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    memory_available_bytes: int
    memory_used_bytes: int
    compute_flops: float
    cpu_percent: float
    load_1m: float
    temperature_celsius: float
    throttling: Throttling
    links: _containers.RepeatedCompositeFieldContainer[LinkReport]
    memory_limit_bytes: int
    memory_limit_source: str
    kind_rates: _containers.RepeatedCompositeFieldContainer[KindRate]
    cpu_available_fraction: float
    def __init__(self, name: _Optional[str] = ..., memory_available_bytes: _Optional[int] = ..., memory_used_bytes: _Optional[int] = ..., compute_flops: _Optional[float] = ..., cpu_percent: _Optional[float] = ..., load_1m: _Optional[float] = ..., temperature_celsius: _Optional[float] = ..., throttling: _Optional[_Union[Throttling, str]] = ..., links: _Optional[_Iterable[_Union[LinkReport, _Mapping]]] = ..., memory_limit_bytes: _Optional[int] = ..., memory_limit_source: _Optional[str] = ..., kind_rates: _Optional[_Iterable[_Union[KindRate, _Mapping]]] = ..., cpu_available_fraction: _Optional[float] = ...) -> None: ...

class KindRate(_message.Message):
    __slots__ = ("kind", "flops_per_second")
    KIND_FIELD_NUMBER: _ClassVar[int]
    FLOPS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    kind: str
    flops_per_second: float
    def __init__(self, kind: _Optional[str] = ..., flops_per_second: _Optional[float] = ...) -> None: ...

class LinkReport(_message.Message):
    __slots__ = ("peer", "bandwidth_bytes_per_second", "latency_seconds", "source")
    PEER_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    peer: str
    bandwidth_bytes_per_second: float
    latency_seconds: float
    source: str
    def __init__(self, peer: _Optional[str] = ..., bandwidth_bytes_per_second: _Optional[float] = ..., latency_seconds: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class TelemetryAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetModelRequest(_message.Message):
    __slots__ = ("model_shape_json", "model_name", "epoch", "assignments")
    MODEL_SHAPE_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    model_shape_json: str
    model_name: str
    epoch: int
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, model_shape_json: _Optional[str] = ..., model_name: _Optional[str] = ..., epoch: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class GetPlacementRequest(_message.Message):
    __slots__ = ("after_epoch",)
    AFTER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    after_epoch: int
    def __init__(self, after_epoch: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("block_id", "worker", "address")
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    block_id: str
    worker: str
    address: str
    def __init__(self, block_id: _Optional[str] = ..., worker: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class PlacementReply(_message.Message):
    __slots__ = ("epoch", "assignments", "policy", "error", "members")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    policy: str
    error: str
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, epoch: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., policy: _Optional[str] = ..., error: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("name", "address", "memory_available_bytes", "compute_flops", "seconds_since_heartbeat", "memory_used_bytes", "cpu_percent", "load_1m", "temperature_celsius", "throttling", "links", "memory_limit_bytes", "memory_limit_source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FLOPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    LOAD_1M_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    THROTTLING_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    memory_available_bytes: int
    compute_flops: float
    seconds_since_heartbeat: float
    memory_used_bytes: int
    cpu_percent: float
    load_1m: float
    temperature_celsius: float
    throttling: Throttling
    links: _containers.RepeatedCompositeFieldContainer[LinkReport]
    memory_limit_bytes: int
    memory_limit_source: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., memory_available_bytes: _Optional[int] = ..., compute_flops: _Optional[float] = ..., seconds_since_heartbeat: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., cpu_percent: _Optional[float] = ..., load_1m: _Optional[float] = ..., temperature_celsius: _Optional[float] = ..., throttling: _Optional[_Union[Throttling, str]] = ..., links: _Optional[_Iterable[_Union[LinkReport, _Mapping]]] = ..., memory_limit_bytes: _Optional[int] = ..., memory_limit_source: _Optional[str] = ...) -> None: ...

class ListWorkersReply(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...
