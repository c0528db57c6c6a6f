"""The gateway: routes requests to engine workers (issue 4; so far the routing policies)."""
