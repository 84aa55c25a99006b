"""Changes to the host around the TUN: routes, rules, resolver, the state journal, privileges."""
