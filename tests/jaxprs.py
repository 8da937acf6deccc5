"""Reading jaxprs in tests: which Pallas kernels a traced program calls."""

import jax


def equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs in its equations' parameters (at any
    depth; a Pallas kernel's own body is not entered)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "pallas_call":
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    yield from equations(inner)


def kernel_calls(jaxpr, name: str) -> list:
    """The calls of the Pallas kernel called ``name`` in ``jaxpr`` (at any depth)."""
    return [e for e in equations(jaxpr)
            if e.primitive.name == "pallas_call" and e.params["name"] == name]
