"""Usher: consent-aware audience messaging for event-ticketing platforms."""
