"""PLACEHOLDER: being written (issue 2)."""


def swiglu(*args, **kwargs):
    raise NotImplementedError("swiglu: being written (issue 2)")
