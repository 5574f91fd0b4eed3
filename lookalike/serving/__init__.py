"""The KServe v2 layer both servers share: v2 errors on the wire (HTTP status, gRPC code and metric
kind of each error, in one table), binary tensors and request ids (`protocol`), the routes a server
answers publicly (`public_surface`), and metrics with one JSON log line per request (`metrics`).
Imports only `lookalike.core`; `metrics` → `protocol` → `public_surface` in that order, no circle.
"""
