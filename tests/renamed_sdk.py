"""What an SDK that renamed its internals looks like from outside: for the tests of the guards around them."""

from __future__ import annotations

from typing import Any


class PublicOnly:
    """Forwards public attributes only: what an SDK that renamed its internals looks like from outside."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)
