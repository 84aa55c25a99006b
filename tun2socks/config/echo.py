"""How a bad value is echoed in a config error: `` (got X)`` for a scalar, its kind otherwise,
never a password a proxy URL may carry."""

from tun2socks.config.proxy_url import hide_url_password


def echo(value: object) -> str:
    """`` (got X)`` for a scalar worth echoing in a message; empty for anything else."""
    if value is None:
        return " (got an empty value)"
    if isinstance(value, bool):
        return f" (got {str(value).lower()})"
    if isinstance(value, int | float):
        return f" (got {value})"
    if isinstance(value, str):
        value = hide_url_password(value)  # a proxy URL put under the wrong key, say
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f" (got {shown!r})"
    return f" (got {kind_of(value)})"


def kind_of(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return "text"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    return "nothing" if value is None else type(value).__name__
