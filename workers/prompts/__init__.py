"""The prompts stage: what a checkout asks (opt-ins, custom fields, login)."""
