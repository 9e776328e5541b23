"""Erasure methods. Each module (or package) registers itself with :mod:`erasekit.registry` on import.

The registry imports the modules listed in ``registry.METHOD_MODULES``; nothing here is imported eagerly.
"""
