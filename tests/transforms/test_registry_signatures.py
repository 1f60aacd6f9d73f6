"""The registry's hyper-parameters are the builders' own: every listed name is a
parameter of the builder (or, through `**kwargs`, of the `scale_by_*` it forwards to),
every parameter without a default is listed, and listed defaults equal the builders'."""

import inspect
import sys

import pytest

from transforms import registry


def _parameters(builder):
    """name -> default (inspect.Parameter.empty when none) of `builder`, `**kwargs`
    followed into the module's `scale_by_<name>`."""
    sig = inspect.signature(builder)
    out = {n: p.default for n, p in sig.parameters.items()
           if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        inner = getattr(sys.modules[builder.__module__], "scale_by_" + builder.__name__)
        for n, p in inspect.signature(inner).parameters.items():
            out.setdefault(n, p.default)
    return out


@pytest.mark.parametrize("name", registry.names())
def test_listed_hyperparameters_match_the_builder(name):
    spec = registry._REGISTRY[name]
    params = _parameters(spec.builder)
    listed = spec.hyper
    assert set(listed) <= set(params), sorted(set(listed) - set(params))
    required = {n for n, d in params.items() if d is inspect.Parameter.empty}
    assert required <= set(listed), sorted(required - set(listed))
    for n, hyper in listed.items():
        if hyper.default is registry.REQUIRED or params[n] is inspect.Parameter.empty:
            continue
        assert hyper.default == params[n], (n, hyper.default, params[n])
