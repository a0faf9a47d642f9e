"""Ray Serve glue over `helios_core` (model replicas, router actor, autoscaler, OpenAI ingress).

Kept thin on purpose: everything that decides or computes lives in `helios_core`, which never
imports Ray. The deployments arrive with the Ray Serve issue; until then `helios generate` runs the
engine in-process.
"""
