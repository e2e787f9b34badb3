"""The decomposition engine: the vocabulary adapters speak (``plan``), readout linear algebra
(``readout``, ``steps``), capture, branch kinds, stage transitions and the engine itself."""
