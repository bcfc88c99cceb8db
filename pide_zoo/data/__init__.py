"""Deprecated, removed in pide_zoo 0.4: the classification data moved to :mod:`pide_zoo.cls.data` in 0.3 (and the
BDD100K converter to the repository's ``tools/bdd100k_converter.py``, behind ``tools/prepare_bdd100k.py``)."""
