"""PLACEHOLDER: being written (issue 2)."""


def rope(*args, **kwargs):
    raise NotImplementedError("rope: being written (issue 2)")


def rope_cos_sin(*args, **kwargs):
    raise NotImplementedError("rope_cos_sin: being written (issue 2)")
