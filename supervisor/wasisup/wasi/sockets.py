"""wasi:sockets — the guest gets its network capability, but every socket and lookup is denied.

A proxy-world guest talks to the outside through wasi:http/outgoing-handler, where outbound
policy is enforced; raw sockets would bypass it.
"""

from __future__ import annotations

from typing import Any

from .abi import Err, Interface, Resource


class Network(Resource):
    """The network capability handle; by itself it grants nothing."""


class TcpSocket(Resource):
    """Never created: socket creation is denied."""


class UdpSocket(Resource):
    """Never created: socket creation is denied."""


class IncomingDatagramStream(Resource):
    """Never created: socket creation is denied."""


class OutgoingDatagramStream(Resource):
    """Never created: socket creation is denied."""


class ResolveAddressStream(Resource):
    """Never created: name lookup is denied."""


def instance_network(store: Any) -> Network:
    return Network()


def denied(*_args: Any) -> None:
    raise Err("access-denied")


INTERFACES = [
    Interface("wasi:sockets/network", resources={"network": Network}, functions={}),
    Interface("wasi:sockets/instance-network", functions={"instance-network": instance_network}),
    Interface("wasi:sockets/tcp", resources={"tcp-socket": TcpSocket}, functions={}, default=denied),
    Interface("wasi:sockets/tcp-create-socket", functions={}, default=denied),
    Interface("wasi:sockets/udp",
              resources={"udp-socket": UdpSocket,
                         "incoming-datagram-stream": IncomingDatagramStream,
                         "outgoing-datagram-stream": OutgoingDatagramStream},
              functions={}, default=denied),
    Interface("wasi:sockets/udp-create-socket", functions={}, default=denied),
    Interface("wasi:sockets/ip-name-lookup", resources={"resolve-address-stream": ResolveAddressStream},
              functions={}, default=denied),
]
