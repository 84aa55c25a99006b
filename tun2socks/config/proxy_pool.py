"""The ``proxy.pool`` settings: logged-in SOCKS5 sessions kept ready (outbound/session_pool.py)."""

from pydantic import BaseModel, ConfigDict, Field


class ProxyPoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Sessions kept ready at most (0: no pool); the pool holds as many as flows were made
    # in the last second, and none while no flows are made.
    size: int = Field(default=8, ge=0, le=64, strict=True)
    # Seconds a ready session may wait before it is closed unused: below the proxy's own
    # negotiation timeout (Dante's timeout.negotiate: 30 s by default).
    max_age: float = Field(default=20.0, gt=0, le=3600, strict=True, allow_inf_nan=False)
