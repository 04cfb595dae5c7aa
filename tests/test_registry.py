"""The registry: a dict plus a decorator that refuses duplicates."""

import pytest

from detkd.registry import Registry


def test_register_get_unregister():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    assert reg.get("a") == 1 and "a" in reg and reg.names() == ["a"]
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(2)
    with pytest.raises(KeyError, match="unknown widget 'b'; available: a"):
        reg.get("b")
    assert reg.unregister("a") == 1 and "a" not in reg
    with pytest.raises(KeyError, match="widget 'a' is not registered"):
        reg.unregister("a")
