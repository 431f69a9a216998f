"""Search spaces as data (params.yaml `sweep.<family>.space`) -> Ray Tune domains, sampled reproducibly."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from ray import tune
from ray.tune.search.sample import Domain, Float, Sampler
from ray.tune.search.variant_generator import generate_variants

from pipeline.params import check_domain


class OneMinusLogUniform(Sampler):
    """beta = 1 - 10^r with r uniform in [log10 lo, log10 hi]: momentum-like values, dense near 1."""

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high  # bounds of 1 - beta
        self._exponent = tune.uniform(math.log10(low), math.log10(high))

    def sample(self, domain: Domain, config: Any = None, size: int = 1, random_state: Any = None) -> Any:
        # the exponent domain takes Tune's random_state as it is, so a seeded search stays seeded
        r = self._exponent.sample(config, size=size, random_state=random_state)
        return 1.0 - 10.0 ** np.asarray(r) if size > 1 else float(1.0 - 10.0 ** r)

    def __str__(self) -> str:
        return "OneMinusLogUniform"


def one_minus_loguniform(low: float, high: float) -> Float:
    """A float domain over [1 - high, 1 - low] whose distance from 1 is log-uniform in [low, high]."""
    domain = Float(1.0 - high, 1.0 - low)
    domain.set_sampler(OneMinusLogUniform(low, high))
    return domain


def domain(key: str, spec: dict[str, Any]) -> Domain:
    """One params.yaml entry ({kind: args}) as a Ray Tune domain; ValueError naming the key when invalid."""
    check_domain(key, spec)
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return tune.choice(list(args))
    low, high = args
    if kind == "loguniform":
        return tune.loguniform(low, high)  # log-uniform is the same whatever the base (10 here, e in Ray)
    if kind == "one_minus_loguniform":
        return one_minus_loguniform(low, high)
    if kind == "uniform":
        return tune.uniform(low, high)
    return tune.randint(low, high)  # high exclusive, as in params.yaml


def search_space(space: dict[str, dict]) -> dict[str, Any]:
    """params.yaml spec (dotted params key -> {kind: args}) -> Ray Tune param_space (same keys)."""
    return {key: domain(f"space.{key}", spec) for key, spec in space.items()}


def plain(value: Any) -> Any:
    """numpy scalars (what Tune samples) as Python values, so configs are JSON and params-valid."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def sample_config(space: dict[str, dict], n: int, seed: int) -> list[dict[str, Any]]:
    """The first n configurations a sweep with this space and seed runs (Tune's own variant generator)."""
    rng = np.random.default_rng(seed)  # what BasicVariantGenerator(random_state=seed) draws from
    spec = {"config": search_space(space)}
    out = []
    for _ in range(n):
        _, resolved = next(generate_variants(spec, random_state=rng))
        out.append({key: plain(value) for key, value in resolved["config"].items()})
    return out
