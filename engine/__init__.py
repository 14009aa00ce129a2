"""pgdag: a durable DAG workflow engine whose only infrastructure is PostgreSQL."""

__version__ = "0.1.0"
