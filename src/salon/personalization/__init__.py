"""Personalization: personalities, characteristics, custom instructions, memory — and the
checks that enforce them on every reply."""
