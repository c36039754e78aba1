"""Integrations of flowsdk with other libraries (each behind its own extra)."""
