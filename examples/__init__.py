"""Runnable, commented example applications built on castore-pydantic."""
