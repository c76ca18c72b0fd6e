"""Clients of the submit stream that know only the wire contract (docs/submitting.md)."""
