"""Signed webhooks of a job's events (docs/api.md, "Webhooks"): `targets` (which URLs and
addresses), `signing` (Standard Webhooks), `post` (one POST with treq), `service` (`Webhooks`:
entries in the store, retries, what dead nodes owed)."""
