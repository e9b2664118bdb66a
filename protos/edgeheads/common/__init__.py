"""What every edgeheads process shares, beside the protos it speaks.

The wire format (tensors, chunks, relay frames), gRPC settings and server scaffolding, the
config loader, and the block spec (block ids, model shape, the Table-I formulas). Nothing here
imports a daemon package: ``edgeheads.worker``, ``edgeheads.controller`` and
``edgeheads.headnode`` import this, never the other way round (docs/architecture.md).
"""
