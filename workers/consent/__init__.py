"""Consent stage: opt-in statuses, their audit log, double opt-in and the customer pages."""
