"""Dataset preparation (BDD100K) and, deprecated until 0.4, the old path of :mod:`pide_zoo.cls.data`."""
