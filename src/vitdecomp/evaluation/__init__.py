"""Evaluation of the component scores: which components are measured
(:mod:`~vitdecomp.evaluation.components`), linear probes (:mod:`~vitdecomp.evaluation.probes`), the
ground truths (:mod:`~vitdecomp.evaluation.truths`), one model's validation
(:mod:`~vitdecomp.evaluation.validate`), the Markdown page (:mod:`~vitdecomp.evaluation.document`) and
the ``vitdecomp validate`` command (:mod:`~vitdecomp.evaluation.cli`)."""
