"""Persistence: SQLAlchemy Core tables, repositories returning plain records, migrations."""
