def unavailable(qualname):
    def _fn(*args, **kwargs):
        raise NotImplementedError(
            f"{qualname}: torchvision stand-in (import-only); real torchvision is not installed"
        )

    _fn.__name__ = qualname.rsplit(".", 1)[-1]
    _fn.__qualname__ = qualname
    return _fn
