"""The routers a config can name (`moe.router_type`), by name.

`switchjax.routing` registers every Router class here as it defines it (`register_router`),
and the package `switchjax` imports `switchjax.routing` first, so the built-in routers are
known whenever a config is. A MoeConfig asks the class it names for its checks
(`config_problem`, `causal_problem`); config itself imports nothing of switchjax.
"""

from __future__ import annotations

from typing import Any

# name -> Router class (any class with the Router class facts: config_problem, causal_problem,
# experts_per_token, hf_problem, fills_capacity, dropless).
ROUTERS: dict[str, Any] = {}


def register_router(name: str):
  """Class decorator: makes a Router subclass available as `moe.router_type=name`."""

  def register(cls):
    cls.router_type = name
    ROUTERS[name] = cls
    return cls

  return register


def router_class(name: str) -> Any:
  """The Router class registered as `name`; ValueError naming the known ones otherwise."""
  if name not in ROUTERS:
    raise ValueError(
      f"moe.router_type={name!r} is not a router; use one of {', '.join(ROUTERS)} (or register "
      "a Router subclass with switchjax.routing.register_router)."
    )
  return ROUTERS[name]
