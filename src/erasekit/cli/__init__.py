"""The ``erasekit`` command line. All argument parsing lives in this package."""
