"""How tun2socks opens its SOCKS5 sessions: ``proxy.pipeline`` and ``proxy.pool``
(outbound/pipeline_probe.py, outbound/session_pool.py)."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from tun2socks.config.proxy_url import hide_url_password


def _pipeline_setting(value: object) -> Literal["auto"] | bool:
    if value == "auto" or isinstance(value, bool):
        return value  # "auto" is the only string let through
    if isinstance(value, str):  # shown like schema.echo: a misplaced URL loses its password
        text = hide_url_password(value)
        shown = repr(text if len(text) <= 40 else text[:37] + "...")
    else:
        shown = repr(value) if isinstance(value, int | float) else "a value of another kind"
    raise ValueError(f"must be auto, true or false (got {shown})")


# auto: probed on first use; true / false: always / never in one write.
PipelineSetting = Annotated[Literal["auto"] | bool, PlainValidator(_pipeline_setting)]


class ProxyPoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Sessions kept ready at most (0: no pool); the pool holds as many as flows were made
    # in the last second, and none while no flows are made.
    size: int = Field(default=8, ge=0, le=64, strict=True)
    # Seconds a ready session may wait before it is closed unused: below the proxy's own
    # negotiation timeout (Dante's timeout.negotiate: 30 s by default).
    max_age: float = Field(default=20.0, gt=0, le=3600, strict=True, allow_inf_nan=False)
    # Seconds: sessions only for a proxy whose login round trip is at least this (0: always).
    # Nearer, a ready session saves less than it costs (outbound/pool_policy.py).
    min_round_trip: float = Field(default=0.002, ge=0, le=10, strict=True, allow_inf_nan=False)


# proxy.early_accept_ttl: seconds a destination stays "known" after its upstream connected
# (outbound/known_destinations.py); proxy.early_accept (off by default) turns the path on.
EarlyAcceptTtl = Annotated[float, Field(gt=0, le=3600, strict=True, allow_inf_nan=False)]
