"""Evaluation: generation runner, the field's protocols and metrics, run records and HTML reports.

Entry points: :func:`erasekit.evaluation.canvas.evaluate_minicanvas`, the protocol registry
:data:`erasekit.evaluation.protocols.PROTOCOLS`, and :func:`erasekit.evaluation.report.write_report`.
Submodules are imported on use, so ``import erasekit.evaluation`` is light.
"""
