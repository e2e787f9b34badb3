"""Evaluation of the component scores: which components are measured
(:mod:`~vitdecomp.evaluation.components`), the
ground truths (:mod:`~vitdecomp.evaluation.truths`), one model's validation
(:mod:`~vitdecomp.evaluation.score_validation`), the Markdown page
(:mod:`~vitdecomp.evaluation.score_document`), the first validation of the alignment
(:mod:`~vitdecomp.evaluation.alignment`), the applications measured on the world
(:mod:`~vitdecomp.evaluation.app_heatmaps`, :mod:`~vitdecomp.evaluation.app_retrieval`), rank agreement
(:mod:`~vitdecomp.evaluation.agreement`) and what every run starts from
(:mod:`~vitdecomp.evaluation.world_runs`). Tooling: only the command layer imports it
(``vitdecomp validate``: :mod:`vitdecomp.commands.validate`)."""
