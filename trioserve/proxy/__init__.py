"""HTTP ingress on hypercorn."""
