"""Accounts: sign-up, sign-in, sessions, API keys, roles."""
