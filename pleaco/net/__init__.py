"""The node's network: container subnets, routes and WireGuard between nodes, service names
across the cluster, and the isolation of app containers from the host's own services.

- ``config``: the ``[network]`` table.
- ``peer``: what the mesh needs to know of another node (``Peer``) and the ``Mesh`` seam.
- ``dnswire``: DNS messages on the wire, for both of pleaco's DNS servers.
- ``names``: the service-name DNS server (``NAME.SUFFIX``) on the node's bridge gateway.
"""
