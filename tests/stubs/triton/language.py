"""``triton.language`` for the stand-in: names used in kernel signatures and bodies."""


class constexpr:  # noqa: N801  (triton's spelling)
    pass


def __getattr__(name: str):
    return constexpr
