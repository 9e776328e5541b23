"""Evaluation: the field's protocols and metrics, the resumable runner, run records and HTML reports.

Entry points: :func:`erasekit.evaluation.protocols.evaluate` (the protocol registry
:data:`erasekit.evaluation.protocols.PROTOCOLS`) and :func:`erasekit.evaluation.report.write_report`.
Submodules are imported on use, so ``import erasekit.evaluation`` is light.
"""
