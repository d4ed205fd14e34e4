"""Adversarial tier: fuzzing, injection payloads and races against a real
server on port 0 and the real PostgreSQL."""
