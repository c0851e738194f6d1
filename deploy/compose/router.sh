#!/bin/sh
# A home router in a container: NAT from LAN_NET to WAN_IP with iptables, as a
# port-restricted cone (the source port is kept, and only the remote address and port
# a LAN host sent to may answer). Rules name subnets, not interfaces, so they still
# hold when the WAN side is disconnected and reconnected under another interface name.
set -eu
: "${LAN_NET:?}" "${WAN_IP:?}"
# No way out of the lab: the WAN is one flat subnet, and Docker's gateway leads out.
ip route del default 2>/dev/null || true
iptables -t nat -A POSTROUTING -s "$LAN_NET" ! -d "$LAN_NET" -j SNAT --to-source "$WAN_IP"
iptables -P FORWARD DROP
iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
iptables -A FORWARD -s "$LAN_NET" ! -d "$LAN_NET" -j ACCEPT
echo "router: $LAN_NET behind $WAN_IP (port-restricted cone)"
exec sleep infinity
