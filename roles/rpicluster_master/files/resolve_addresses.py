"""rpicluster_master's firewall: the addresses of the inventory's Pis, as the master resolves them.

Run on the master by roles/rpicluster_master/tasks/firewall.yml with its python3
(standard library only; it only reads). Arguments: a JSON list of
``[inventory name, ansible_host or ""]`` pairs (the host's address is its
``ansible_host``, else its inventory name), then a JSON list of more host names,
addresses or networks (``10.0.0.0/24``). Prints one JSON object:
``{"v4": [...], "v6": [...], "unresolved": [...]}``, sorted and without
duplicates, so the rendered table only changes when an address does.
"""

import ipaddress
import json
import socket
import sys


def main() -> None:
    v4, v6, unresolved = set(), set(), []
    hosts = [address or name for name, address in json.loads(sys.argv[1])]
    for name in hosts + json.loads(sys.argv[2]):
        try:
            networks = [ipaddress.ip_network(name, strict=False)]
        except ValueError:
            try:
                found = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                unresolved.append(name)
                continue
            networks = [ipaddress.ip_network(info[4][0].split("%")[0]) for info in found]
        for network in networks:
            (v4 if network.version == 4 else v6).add(network)
    print(
        json.dumps(
            {
                "v4": [str(n) for n in sorted(v4)],
                "v6": [str(n) for n in sorted(v6)],
                "unresolved": unresolved,
            }
        )
    )


if __name__ == "__main__":
    main()
