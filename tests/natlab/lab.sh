#!/usr/bin/env bash
# NAT lab: real NATs built from network namespaces, veth pairs, bridges and
# iptables, for testing and benchmarking Servant's NAT traversal. Needs root,
# iproute2 and iptables (tests/setup/system.sh installs them). Nothing is created
# in the host's own namespace and nothing routes out of the lab.
#
#   public segment 198.18.0.0/24: a bridge inside namespace LAB-pub (198.18.0.254)
#     LAB-boot 198.18.0.10 ─┐
#     LAB-s1   198.18.0.11 ─┼─ bridge ─┬─ LAB-ra wan 198.18.0.21 │ lan 10.1.0.1 ─ LAB-pa 10.1.0.2
#                                      └─ LAB-rb wan 198.18.0.22 │ lan 10.2.0.1 ─ LAB-pb 10.2.0.2
#
# Usage (as root):
#   lab.sh up LAB                                 the public segment (LAB: [a-z][a-z0-9]{0,5})
#   lab.sh host LAB NAME IP                       a public host (NAME: [a-z][a-z0-9]{0,7})
#   lab.sh router LAB NAME WAN_IP LAN_NET TYPE    a NAT router; TYPE is one of
#                                                 port-restricted address-restricted full-cone symmetric
#   lab.sh peer LAB NAME ROUTER IP                a peer on ROUTER's LAN
#   lab.sh forward LAB ROUTER PROTO PORT LAN_IP   port forward WAN_IP:PORT -> LAN_IP:PORT (tcp|udp)
#   lab.sh unforward LAB ROUTER PROTO PORT LAN_IP removes it
#   lab.sh upnp LAB ROUTER                        runs miniupnpd (an IGD) on ROUTER, whose WAN_IP
#                                                 must be in 11.0.0.0/24 (a global-looking prefix)
#   lab.sh delay LAB ROUTER MS                    every packet ROUTER forwards, either way, waits
#                                                 MS milliseconds (delay.py on an NFQUEUE: no netem)
#   lab.sh exec LAB NAME CMD...                   runs CMD in namespace LAB-NAME (NAME "pub": the segment)
#   lab.sh check LAB ROUTER PEER                  self-check: the router behaves as its TYPE says
#   lab.sh status LAB                             what the lab holds
#   lab.sh down LAB                               deletes everything of the lab (idempotent)
#
# Example:
#   lab.sh up nl1
#   lab.sh host nl1 boot 198.18.0.10 && lab.sh host nl1 s1 198.18.0.11
#   lab.sh router nl1 ra 198.18.0.21 10.1.0.0/24 port-restricted
#   lab.sh peer nl1 pa ra 10.1.0.2
#   lab.sh check nl1 ra pa
#   lab.sh exec nl1 pa servant run ...
#   lab.sh down nl1
#
# full-cone and address-restricted routers send every unsolicited inbound TCP/UDP
# packet to the LAN's .2, so they assume a single peer there (LAN .2).
# check runs probe.py observers on the lab's first two public hosts (or the two
# named in NATLAB_OBSERVERS="h1 h2") on ports NATLAB_OBS_PORTS (3478,3479).
# Environment: NATLAB_IPTABLES (iptables; or iptables-legacy / iptables-nft),
# NATLAB_PYTHON (python3 for probe.py), NATLAB_PROBE_WAIT (0.4 s per filter probe).
# State (node kinds, addresses, router types) is kept in /run/servant-natlab/LAB/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE_ROOT=/run/servant-natlab
PUB_PREFIX=198.18.0
PUB_DIAG_IP=198.18.0.254
# A second public prefix on the same segment for UPnP routers: libp2p-upnp refuses a
# gateway whose external address is not global (198.18/15 is benchmarking space), so
# they need a global-looking address. 11.0.0.0/24 lives only inside the lab's
# namespaces, where nothing routes out.
GLOBAL_PREFIX=11.0.0
GLOBAL_DIAG_IP=11.0.0.254
TYPES="port-restricted address-restricted full-cone symmetric"
RESERVED="pub wan lan eth"

die() {
    echo "lab.sh: ERROR: $*" >&2
    exit 1
}
warn() { echo "lab.sh: warning: $*" >&2; }

if [ -z "${NATLAB_PYTHON:-}" ]; then
    # The system interpreter starts fastest (no version-manager shim); stdlib only.
    if [ -x /usr/bin/python3 ]; then NATLAB_PYTHON=/usr/bin/python3; else NATLAB_PYTHON=python3; fi
fi
PROBE_WAIT=${NATLAB_PROBE_WAIT:-0.4}
OBS_PORTS=${NATLAB_OBS_PORTS:-3478,3479}

# ------------------------------------------------------------------ helpers

need_tools() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces)"
    command -v ip >/dev/null || die "ip not found (run tests/setup/system.sh)"
}

valid_lab() {
    [[ $1 =~ ^[a-z][a-z0-9]{0,5}$ ]] || die "lab name '$1': want [a-z][a-z0-9]{0,5} (interface names stay <= 15 chars)"
}

valid_name() {
    [[ $1 =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "name '$1': want [a-z][a-z0-9]{0,7}"
    local r
    for r in $RESERVED; do [ "$1" != "$r" ] || die "name '$1' is reserved"; done
}

ip2int() {
    local d='(0|[1-9][0-9]{0,2})' i o=() # no leading zeros: iproute2 would read them as octal
    [[ $1 =~ ^$d\.$d\.$d\.$d$ ]] || die "not an IPv4 address: '$1'"
    for i in 1 2 3 4; do
        o[i]=${BASH_REMATCH[i]}
        ((o[i] <= 255)) || die "not an IPv4 address: '$1'"
    done
    echo $(((o[1] << 24) | (o[2] << 16) | (o[3] << 8) | o[4]))
}
int2ip() { echo "$((($1 >> 24) & 255)).$((($1 >> 16) & 255)).$((($1 >> 8) & 255)).$(($1 & 255))"; }

nsname() { echo "$1-$2"; }
ns_exists() { [ -e "/run/netns/$1" ]; }
state_dir() { echo "$STATE_ROOT/$1"; }

require_up() {
    ns_exists "$(nsname "$1" pub)" || die "lab $1 is not up (lab.sh up $1)"
    [ -f "$(state_dir "$1")/lab" ] || die "lab $1 has no state in $(state_dir "$1") (lab.sh down $1; lab.sh up $1)"
}

# Loads a node's state file into NODE_* variables.
load_node() {
    local f
    f="$(state_dir "$1")/node.$2"
    [ -f "$f" ] || die "lab $1 has no node '$2'"
    NODE_KIND= NODE_IP= NODE_IPT= NODE_TYPE= NODE_LAN_NET= NODE_LAN_IP= NODE_PREFIX= NODE_DNAT_TO= NODE_ROUTER=
    # shellcheck disable=SC1090
    . "$f"
}

lab_iptables() {
    # shellcheck disable=SC1091
    (. "$(state_dir "$1")/lab" && echo "$IPT")
}

# Creates a namespace with loopback up, IPv6 off (the lab is IPv4 only: no
# link-local path around the NATs), bridge netfilter off and forwarding as given.
new_ns() {
    local ns=$1 forward=$2
    ns_exists "$ns" && die "namespace $ns exists already"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Bridged frames must not go through this namespace's iptables (br_netfilter);
    # both of these settings are missing when the kernel lacks the feature.
    ip netns exec "$ns" sh -c "sysctl -qw net.ipv4.ip_forward=$forward &&
        { sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 2>/dev/null;
          sysctl -qw net.bridge.bridge-nf-call-iptables=0 2>/dev/null; true; }"
}

# A veth pair: INNER in namespace NS, its other end LAB-NAME on the public bridge.
plug_public() {
    local lab=$1 name=$2 ns=$3 inner=$4 ip=$5 pub
    pub=$(nsname "$lab" pub)
    ip -n "$pub" link add "$lab-$name" type veth peer name "$inner" netns "$ns"
    ip -n "$pub" link set "$lab-$name" master "$lab-pub" up
    ip -n "$ns" -b - <<EOF
addr add $ip/24 dev $inner
link set $inner up
route add $(other_prefix "$ip").0/24 dev $inner
EOF
}

# The segment's other /24: both are on-link for every public host and router.
other_prefix() {
    if [[ $1 == "$GLOBAL_PREFIX".* ]]; then echo "$PUB_PREFIX"; else echo "$GLOBAL_PREFIX"; fi
}

valid_pub_ip() {
    local n base p
    n=$(ip2int "$1")
    for p in "$PUB_PREFIX" "$GLOBAL_PREFIX"; do
        base=$(ip2int "$p.0")
        ((n > base && n < base + 254)) && return 0
    done
    die "'$1' is not a host address of $PUB_PREFIX.0/24 or $GLOBAL_PREFIX.0/24 (.1-.253)"
}

record() { echo "$3" >"$(state_dir "$1")/node.$2"; }

# Fails when IP is taken on the segment: the public one (ROUTER empty) or ROUTER's LAN.
ip_free() {
    local lab=$1 ip=$2 router=${3:-} f
    for f in "$(state_dir "$lab")"/node.*; do
        [ -f "$f" ] || continue
        load_node "$lab" "${f##*/node.}"
        if [ -z "$router" ]; then
            [[ $NODE_KIND = peer || $NODE_IP != "$ip" ]] || die "$ip is taken by ${f##*/node.}"
        else
            [[ $NODE_KIND != peer || $NODE_ROUTER != "$router" || $NODE_IP != "$ip" ]] ||
                die "$ip is taken by ${f##*/node.} on $router's LAN"
        fi
    done
}

# ---------------------------------------------------------------- commands

cmd_up() {
    [ $# -eq 1 ] || die "usage: lab.sh up LAB"
    local lab=$1 pub ipt
    valid_lab "$lab"
    pub=$(nsname "$lab" pub)
    ns_exists "$pub" && die "lab $lab is up already (lab.sh down $lab first)"
    ipt=${NATLAB_IPTABLES:-iptables}
    command -v "$ipt" >/dev/null || die "$ipt not found (run tests/setup/system.sh)"
    command -v "$ipt-restore" >/dev/null || die "$ipt-restore not found"
    rm -rf "$(state_dir "$lab")"
    mkdir -p "$(state_dir "$lab")"
    echo "IPT=$ipt" >"$(state_dir "$lab")/lab"
    : >"$(state_dir "$lab")/hosts"
    new_ns "$pub" 0
    ip -n "$pub" -b - <<EOF
link add $lab-pub type bridge
addr add $PUB_DIAG_IP/24 dev $lab-pub
addr add $GLOBAL_DIAG_IP/24 dev $lab-pub
link set $lab-pub up
EOF
    echo "lab $lab up: public segment $PUB_PREFIX.0/24 in namespace $pub"
}

cmd_host() {
    [ $# -eq 3 ] || die "usage: lab.sh host LAB NAME IP"
    local lab=$1 name=$2 ip=$3 ns
    valid_lab "$lab"
    valid_name "$name"
    require_up "$lab"
    valid_pub_ip "$ip"
    ip_free "$lab" "$ip"
    ns=$(nsname "$lab" "$name")
    new_ns "$ns" 0
    record "$lab" "$name" "NODE_KIND=host NODE_IP=$ip"
    plug_public "$lab" "$name" "$ns" "$lab-eth" "$ip"
    echo "$name" >>"$(state_dir "$lab")/hosts"
    echo "host $ns: $ip"
}

# The router's iptables rules, for iptables-restore.
router_rules() {
    local type=$1 wan=$2 wan_ip=$3 lan=$4 lan_net=$5 peer=$6
    echo "*nat"
    echo ":PREROUTING ACCEPT [0:0]"
    echo ":INPUT ACCEPT [0:0]"
    echo ":OUTPUT ACCEPT [0:0]"
    echo ":POSTROUTING ACCEPT [0:0]"
    echo ":NATLAB-DNAT - [0:0]"
    echo ":NATLAB-SNAT - [0:0]"
    echo "-A PREROUTING -i $wan -j NATLAB-DNAT"
    echo "-A POSTROUTING -o $wan -j NATLAB-SNAT"
    case $type in
    full-cone | address-restricted)
        # Every inbound TCP/UDP packet no connection claims goes to the one peer,
        # port kept: endpoint-independent mapping seen from outside.
        echo "-A PREROUTING -i $wan -d $wan_ip -p udp -j DNAT --to-destination $peer"
        echo "-A PREROUTING -i $wan -d $wan_ip -p tcp -j DNAT --to-destination $peer"
        ;;
    esac
    case $type in
    symmetric)
        # A random outside port for every new flow: every destination sees another port.
        echo "-A POSTROUTING -o $wan -s $lan_net -j MASQUERADE --random-fully"
        ;;
    *)
        # Conntrack's own choice: the source port is kept while free, whatever the destination.
        echo "-A POSTROUTING -o $wan -s $lan_net -j SNAT --to-source $wan_ip"
        ;;
    esac
    echo "COMMIT"
    echo "*filter"
    echo ":INPUT ACCEPT [0:0]"
    echo ":FORWARD DROP [0:0]"
    echo ":OUTPUT ACCEPT [0:0]"
    echo ":NATLAB-FWD - [0:0]"
    # Unsolicited packets to the router die silently (as at home routers; a reset or
    # port-unreachable would kill TCP simultaneous open and QUIC punching). Dropped
    # here they are never confirmed in conntrack, so they leave no entry behind that
    # could make a later outbound flow change port.
    echo "-A INPUT -i $wan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    echo "-A INPUT -i $wan -p icmp --icmp-type echo-request -j ACCEPT"
    echo "-A INPUT -i $wan -j DROP"
    echo "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    echo "-A FORWARD -i $lan -o $lan -j ACCEPT"
    if [ "$type" = address-restricted ]; then
        # Remember every remote address the LAN sends to...
        echo "-A FORWARD -i $lan -o $wan -m recent --name natlab --set --rdest"
    fi
    echo "-A FORWARD -i $lan -o $wan -j ACCEPT"
    echo "-A FORWARD -i $wan -j NATLAB-FWD"
    case $type in
    full-cone)
        echo "-A FORWARD -i $wan -o $lan -d $peer -m conntrack --ctstate DNAT -j ACCEPT"
        ;;
    address-restricted)
        # ...and admit unsolicited packets only from those addresses (any port).
        echo "-A FORWARD -i $wan -o $lan -d $peer -m conntrack --ctstate DNAT -m recent --name natlab --rcheck --rsource -j ACCEPT"
        ;;
    esac
    echo "COMMIT"
}

cmd_router() {
    [ $# -eq 5 ] || die "usage: lab.sh router LAB NAME WAN_IP LAN_NET TYPE"
    local lab=$1 name=$2 wan_ip=$3 lan_net=$4 type=$5 ns t ok= net prefix base mask lan_ip peer ipt
    valid_lab "$lab"
    valid_name "$name"
    require_up "$lab"
    valid_pub_ip "$wan_ip"
    ip_free "$lab" "$wan_ip"
    for t in $TYPES; do [ "$type" = "$t" ] && ok=1; done
    [ -n "$ok" ] || die "NAT type '$type': want one of $TYPES"
    [[ $lan_net =~ ^([0-9.]+)/([0-9]+)$ ]] || die "LAN_NET '$lan_net': want a.b.c.d/len"
    net=${BASH_REMATCH[1]}
    prefix=${BASH_REMATCH[2]}
    ((prefix >= 8 && prefix <= 30)) || die "LAN_NET '$lan_net': prefix length 8-30"
    mask=$(((0xffffffff << (32 - prefix)) & 0xffffffff))
    base=$(($(ip2int "$net") & mask))
    lan_ip=$(int2ip $((base + 1)))
    peer=$(int2ip $((base + 2)))
    lan_net="$(int2ip "$base")/$prefix"
    ipt=$(lab_iptables "$lab")
    ns=$(nsname "$lab" "$name")
    new_ns "$ns" 1
    record "$lab" "$name" "NODE_KIND=router NODE_IP=$wan_ip NODE_TYPE=$type NODE_LAN_NET=$lan_net NODE_LAN_IP=$lan_ip NODE_PREFIX=$prefix NODE_DNAT_TO=$peer"
    plug_public "$lab" "$name" "$ns" "$lab-wan" "$wan_ip"
    ip -n "$ns" -b - <<EOF
link add $lab-lan type bridge
addr add $lan_ip/$prefix dev $lab-lan
link set $lab-lan up
EOF
    router_rules "$type" "$lab-wan" "$wan_ip" "$lab-lan" "$lan_net" "$peer" |
        ip netns exec "$ns" "$ipt-restore" -w
    echo "router $ns ($type): wan $wan_ip, lan $lan_net at $lan_ip"
}

cmd_peer() {
    [ $# -eq 4 ] || die "usage: lab.sh peer LAB NAME ROUTER IP"
    local lab=$1 name=$2 router=$3 ip=$4 ns rns n base mask
    valid_lab "$lab"
    valid_name "$name"
    require_up "$lab"
    load_node "$lab" "$router"
    [ "$NODE_KIND" = router ] || die "'$router' is not a router"
    mask=$(((0xffffffff << (32 - NODE_PREFIX)) & 0xffffffff))
    base=$(($(ip2int "${NODE_LAN_NET%/*}") & mask))
    n=$(ip2int "$ip")
    (((n & mask) == base && n > base + 1 && n < (base | (~mask & 0xffffffff)))) ||
        die "'$ip' is not a free host address of $NODE_LAN_NET (the router is $NODE_LAN_IP)"
    local r_type=$NODE_TYPE r_ip=$NODE_IP r_prefix=$NODE_PREFIX r_lan_ip=$NODE_LAN_IP r_dnat=$NODE_DNAT_TO
    ip_free "$lab" "$ip" "$router"
    case $r_type in
    full-cone | address-restricted)
        [ "$ip" = "$r_dnat" ] ||
            warn "$r_type router $router sends unsolicited traffic to $r_dnat only, not to $ip"
        ;;
    esac
    ns=$(nsname "$lab" "$name")
    rns=$(nsname "$lab" "$router")
    new_ns "$ns" 0
    record "$lab" "$name" "NODE_KIND=peer NODE_IP=$ip NODE_ROUTER=$router"
    ip -n "$rns" link add "$lab-$name" type veth peer name "$lab-eth" netns "$ns"
    ip -n "$rns" link set "$lab-$name" master "$lab-lan" up
    ip -n "$ns" -b - <<EOF
addr add $ip/$r_prefix dev $lab-eth
link set $lab-eth up
route add default via $r_lan_ip
EOF
    echo "peer $ns: $ip behind $router ($r_type, outside $r_ip)"
}

# forward/unforward: DNAT WAN_IP:PORT to LAN_IP:PORT, admit it, and pin the
# peer's outbound flows from PORT to the same outside port (as a router's port
# forward does), so the peer looks public on that port, even behind a symmetric NAT.
cmd_forward() {
    local action=$1
    shift
    [ $# -eq 5 ] || die "usage: lab.sh $action LAB ROUTER PROTO PORT LAN_IP"
    local lab=$1 router=$2 proto=$3 port=$4 lan_ip=$5 ns ipt rule
    valid_lab "$lab"
    require_up "$lab"
    load_node "$lab" "$router"
    [ "$NODE_KIND" = router ] || die "'$router' is not a router"
    [[ $proto = tcp || $proto = udp ]] || die "PROTO '$proto': tcp or udp"
    [[ $port =~ ^[0-9]+$ ]] && ((port >= 1 && port <= 65535)) || die "PORT '$port'"
    ip2int "$lan_ip" >/dev/null
    ns=$(nsname "$lab" "$router")
    ipt=${NODE_IPT:-$(lab_iptables "$lab")}
    local rules=(
        "-t nat NATLAB-DNAT -i $lab-wan -d $NODE_IP -p $proto --dport $port -j DNAT --to-destination $lan_ip:$port"
        "-t nat NATLAB-SNAT -o $lab-wan -s $lan_ip -p $proto --sport $port -j SNAT --to-source $NODE_IP:$port"
        "-t filter NATLAB-FWD -i $lab-wan -d $lan_ip -p $proto --dport $port -m conntrack --ctstate DNAT -j ACCEPT"
    )
    for rule in "${rules[@]}"; do
        # shellcheck disable=SC2086
        set -- $rule
        local table=$2 chain=$3
        shift 3
        if [ "$action" = forward ]; then
            ip netns exec "$ns" "$ipt" -w -t "$table" -C "$chain" "$@" 2>/dev/null ||
                ip netns exec "$ns" "$ipt" -w -t "$table" -A "$chain" "$@"
        else
            while ip netns exec "$ns" "$ipt" -w -t "$table" -C "$chain" "$@" 2>/dev/null; do
                ip netns exec "$ns" "$ipt" -w -t "$table" -D "$chain" "$@"
            done
        fi
    done
    if [ "$action" = forward ]; then
        echo "$router: $proto $NODE_IP:$port -> $lan_ip:$port"
    else
        echo "$router: $proto $NODE_IP:$port no longer forwarded"
    fi
}

# upnp: miniupnpd-iptables drives the legacy xtables (libiptc), and a packet must
# pass both legacy and nft tables, so a UPnP router's rules all move to legacy.
cmd_upnp() {
    [ $# -eq 2 ] || die "usage: lab.sh upnp LAB ROUTER"
    local lab=$1 router=$2 ns ipt dir conf pidf log legacy=iptables-legacy i
    valid_lab "$lab"
    require_up "$lab"
    load_node "$lab" "$router"
    [ "$NODE_KIND" = router ] || die "'$router' is not a router"
    [[ $NODE_IP == "$GLOBAL_PREFIX".* ]] ||
        die "router $router's WAN $NODE_IP is not global-looking: libp2p-upnp would refuse it (use $GLOBAL_PREFIX.0/24)"
    [ -z "$NODE_IPT" ] || die "router $router runs UPnP already"
    # Its rules reload whole tables, the mangle table with a delay's NFQUEUE rule too.
    [ ! -e "$(state_dir "$lab")/delay-$router.log" ] || die "router $router has a delay: run upnp first"
    command -v miniupnpd >/dev/null || [ -x /usr/sbin/miniupnpd ] ||
        die "miniupnpd not found (tests/setup/system.sh installs miniupnpd-iptables)"
    command -v "$legacy-restore" >/dev/null || die "$legacy-restore not found"
    ns=$(nsname "$lab" "$router")
    ipt=$(lab_iptables "$lab")
    dir=$(state_dir "$lab")
    local wan=$lab-wan lan=$lab-lan
    if [ "$ipt" != "$legacy" ]; then
        ip netns exec "$ns" "$ipt" -w -P FORWARD ACCEPT
        for i in nat filter; do
            ip netns exec "$ns" "$ipt" -w -t "$i" -F
            ip netns exec "$ns" "$ipt" -w -t "$i" -X
        done
    fi
    {
        router_rules "$NODE_TYPE" "$wan" "$NODE_IP" "$lan" "$NODE_LAN_NET" "$NODE_DNAT_TO" |
            sed -e '/^\*nat$/a :MINIUPNPD - [0:0]\n:MINIUPNPD-POSTROUTING - [0:0]\n-A PREROUTING -i '"$wan"' -j MINIUPNPD\n-A POSTROUTING -o '"$wan"' -j MINIUPNPD-POSTROUTING' \
                -e '/^\*filter$/a :MINIUPNPD - [0:0]\n-A FORWARD -i '"$wan"' ! -o '"$wan"' -j MINIUPNPD'
        printf '*mangle\n:MINIUPNPD - [0:0]\n-A PREROUTING -i %s -j MINIUPNPD\nCOMMIT\n' "$wan"
    } | ip netns exec "$ns" "$legacy-restore" -w
    echo "NODE_IPT=$legacy" >>"$dir/node.$router"
    conf=$dir/miniupnpd-$router.conf
    pidf=$dir/miniupnpd-$router.pid
    log=$dir/miniupnpd-$router.log
    cat >"$conf" <<EOF
ext_ifname=$wan
listening_ip=$lan
http_port=0
enable_natpmp=no
enable_upnp=yes
secure_mode=yes
system_uptime=yes
notify_interval=60
clean_ruleset_interval=600
lease_file=$dir/miniupnpd-$router.leases
uuid=$(cat /proc/sys/kernel/random/uuid)
allow 1024-65535 $NODE_LAN_NET 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
EOF
    # -d keeps it in the foreground logging to stderr; setsid and the redirections
    # detach it from the caller, which may be waiting for our output to close.
    setsid ip netns exec "$ns" miniupnpd -d -f "$conf" -P "$pidf" </dev/null >"$log" 2>&1 &
    for i in $(seq 100); do
        grep -q "HTTP listening\|Listening for NAT-PMP\|SSDP" "$log" 2>/dev/null && break
        kill -0 $! 2>/dev/null || die "miniupnpd died: $(cat "$log")"
        sleep 0.05
    done
    echo "router $ns: miniupnpd on $lan for $NODE_LAN_NET, mapping on $wan $NODE_IP (log $log)"
}

# delay: latency without netem. The router queues every packet it forwards (both
# directions, after DNAT and before SNAT) to NFQUEUE 0 of its namespace, and delay.py
# there accepts each MS milliseconds later. No --queue-bypass: if delay.py dies the
# router drops instead of silently forwarding without the delay.
cmd_delay() {
    [ $# -eq 3 ] || die "usage: lab.sh delay LAB ROUTER MS"
    local lab=$1 router=$2 ms=$3 ns ipt log i
    valid_lab "$lab"
    require_up "$lab"
    load_node "$lab" "$router"
    [ "$NODE_KIND" = router ] || die "'$router' is not a router"
    [[ $ms =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "MS '$ms': a number of milliseconds"
    ns=$(nsname "$lab" "$router")
    ipt=${NODE_IPT:-$(lab_iptables "$lab")}
    log=$(state_dir "$lab")/delay-$router.log
    # The log doubles as the router's mark of a delay (`upnp` checks it too).
    [ ! -e "$log" ] || die "router $router has a delay already"
    setsid ip netns exec "$ns" "$NATLAB_PYTHON" "$HERE/delay.py" 0 "$ms" </dev/null >"$log" 2>&1 &
    local pid=$!
    # On failure the shim goes and its log moves aside, so a retry starts clean.
    failed() {
        kill "$pid" 2>/dev/null || true
        mv "$log" "$log.failed"
        die "router $router: $1: $(cat "$log.failed")"
    }
    for i in $(seq 250); do
        grep -q '^ready' "$log" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || failed "delay.py died"
        sleep 0.02
    done
    grep -q '^ready' "$log" || failed "delay.py did not bind its queue within 5 s"
    ip netns exec "$ns" "$ipt" -w -t mangle -A FORWARD -j NFQUEUE --queue-num 0 ||
        failed "cannot add the NFQUEUE rule"
    echo "router $ns: forwarded packets wait $ms ms (log $log)"
}

cmd_exec() {
    [ $# -ge 3 ] || die "usage: lab.sh exec LAB NAME CMD..."
    local lab=$1 name=$2 ns
    shift 2
    valid_lab "$lab"
    ns=$(nsname "$lab" "$name")
    ns_exists "$ns" || die "no namespace $ns"
    exec ip netns exec "$ns" "$@"
}

# The lab's namespaces, from /run/netns (`ip netns list` complains about namespaces
# another lab is deleting at the same moment).
lab_namespaces() { find /run/netns -mindepth 1 -maxdepth 1 -name "$1-*" -printf '%f\n' 2>/dev/null | sort; }

cmd_status() {
    [ $# -eq 1 ] || die "usage: lab.sh status LAB"
    local lab=$1 f
    valid_lab "$lab"
    echo "namespaces:"
    lab_namespaces "$lab" | sed 's/^/  /'
    for f in "$(state_dir "$lab")"/node.*; do
        [ -f "$f" ] || continue
        echo "${f##*/node.}: $(cat "$f")"
    done
}

cmd_down() {
    [ $# -eq 1 ] || die "usage: lab.sh down LAB"
    local lab=$1 ns pids=() p i f
    valid_lab "$lab"
    for f in "$(state_dir "$lab")"/miniupnpd-*.pid; do
        [ -f "$f" ] && read -r p <"$f" && [[ $p =~ ^[0-9]+$ ]] && pids+=("$p")
    done
    # A process left inside a namespace would keep it (and its veths) alive after
    # `ip netns del`: end the lab's processes first, by pid.
    for ns in $(lab_namespaces "$lab"); do
        for p in $(ip netns pids "$ns" 2>/dev/null); do pids+=("$p"); done
    done
    if [ ${#pids[@]} -gt 0 ]; then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for i in $(seq 20); do
            kill -0 "${pids[@]}" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
    for ns in $(lab_namespaces "$lab"); do
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$(state_dir "$lab")"
    [ -z "$(lab_namespaces "$lab")" ] || die "namespaces of $lab left: $(lab_namespaces "$lab" | tr '\n' ' ')"
    echo "lab $lab down"
}

# ------------------------------------------------------------------- check

CHECK_FAILED=0
checked() { # property, saw, want
    if [ "$2" = "$3" ]; then
        echo "checked: $1: $2 (ok)"
    else
        echo "checked: $1: $2, want $3 (FAIL)"
        CHECK_FAILED=1
    fi
}

OBS_PIDS=()
stop_observers() {
    local p
    for p in "${OBS_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${OBS_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    OBS_PIDS=()
}

cmd_check() {
    [ $# -eq 3 ] || die "usage: lab.sh check LAB ROUTER PEER"
    local lab=$1 router=$2 peer=$3 dir rtype wan rns pns obs=() h hip=() i ready json
    valid_lab "$lab"
    require_up "$lab"
    dir=$(state_dir "$lab")
    load_node "$lab" "$router"
    [ "$NODE_KIND" = router ] || die "'$router' is not a router"
    rtype=$NODE_TYPE
    wan=$NODE_IP
    local gw=$NODE_LAN_IP
    load_node "$lab" "$peer"
    [ "$NODE_KIND" = peer ] && [ "$NODE_ROUTER" = "$router" ] || die "'$peer' is not a peer behind $router"
    local peer_ip=$NODE_IP
    rns=$(nsname "$lab" "$router")
    pns=$(nsname "$lab" "$peer")
    if [ -n "${NATLAB_OBSERVERS:-}" ]; then
        read -r -a obs <<<"$NATLAB_OBSERVERS"
    else
        mapfile -t obs < <(head -n 2 "$dir/hosts")
    fi
    [ ${#obs[@]} -eq 2 ] || die "check needs two public hosts as observers (lab.sh host $lab NAME IP, twice)"
    for h in "${obs[@]}"; do
        load_node "$lab" "$h"
        [ "$NODE_KIND" = host ] || die "observer '$h' is not a public host"
        hip+=("$NODE_IP")
    done

    trap stop_observers EXIT
    for i in 0 1; do
        ready="$dir/observer-${obs[i]}.ready"
        rm -f "$ready"
        ip netns exec "$(nsname "$lab" "${obs[i]}")" "$NATLAB_PYTHON" "$HERE/probe.py" observe \
            --ports "$OBS_PORTS" --ready-file "$ready" 2>"$dir/observer-${obs[i]}.log" &
        OBS_PIDS+=($!)
    done
    for i in $(seq 200); do
        [ -f "$dir/observer-${obs[0]}.ready" ] && [ -f "$dir/observer-${obs[1]}.ready" ] && break
        kill -0 "${OBS_PIDS[@]}" 2>/dev/null || die "an observer died: $(cat "$dir"/observer-*.log)"
        sleep 0.02
    done
    json="$dir/check-$router-$peer.json"
    ip netns exec "$pns" "$NATLAB_PYTHON" "$HERE/probe.py" client --compact \
        --a "${hip[0]}" --b "${hip[1]}" --ports "$OBS_PORTS" --wait "$PROBE_WAIT" >"$json" || true
    stop_observers
    trap - EXIT

    local -A r=()
    local k v
    while IFS='=' read -r k v; do r[$k]=$v; done < <("$NATLAB_PYTHON" "$HERE/probe.py" flatten <"$json")
    [ -n "${r[nat_type]:-}" ] || die "probe gave no result: $(cat "$json")"

    echo "router $rns ($rtype, wan $wan), peer $pns ($peer_ip), observers ${obs[0]} ${hip[0]} and ${obs[1]} ${hip[1]}; probe: $json"
    local want_map=endpoint-independent want_a=blocked want_b=blocked proto saw ports l
    case $rtype in
    address-restricted) want_a=open ;;
    full-cone) want_a=open want_b=open ;;
    esac
    [ -z "${r[errors]:-}" ] || {
        echo "checked: probe ran without errors: ${r[errors]:-} (FAIL)"
        CHECK_FAILED=1
    }
    for proto in udp tcp; do
        checked "$proto mapped address is the router's WAN address (${r[$proto.mapped_ips]:-})" \
            "${r[$proto.mapped_ips]:-}" "$wan"
        saw=${r[$proto.mapping]:-}
        if [ "$rtype" = symmetric ]; then
            [ "$saw" = endpoint-independent ] || [ "$saw" = unknown ] || saw=endpoint-dependent
            want_map=endpoint-dependent
        fi
        ports=
        for l in a1 a2 b1 b2; do
            [ -n "${r[$proto.mapped.$l]+x}" ] || continue
            ports+=" ${l^}>${r[$proto.mapped.$l]##*:}"
        done
        checked "$proto mapping (outside port per observer:port${ports:- none}; local ${r[local]:-})" \
            "$saw" "$want_map"
        checked "$proto unsolicited from observer A's other port" \
            "$([ "${r[$proto.open_a_other_port]:-}" = true ] && echo open || echo blocked)" "$want_a"
        checked "$proto unsolicited from observer B (never contacted)" \
            "$([ "${r[$proto.open_b]:-}" = true ] && echo open || echo blocked)" "$want_b"
    done
    checked "udp NAT type as classified by the probe" "${r[nat_type]:-}" "$rtype"
    checked "router $router has no default route" \
        "$(ip -n "$rns" route show default | grep -q . && echo "has one" || echo none)" none
    checked "peer $peer's default route" \
        "$(ip -n "$pns" route show default | awk '{print $3; exit}')" "$gw"
    checked "LAN address $peer_ip from public host ${obs[0]}" \
        "$(ip -n "$(nsname "$lab" "${obs[0]}")" route get "$peer_ip" >/dev/null 2>&1 && echo routable || echo unreachable)" unreachable
    if [ "$CHECK_FAILED" -ne 0 ]; then
        echo "check FAILED: router $router does not behave as $rtype" >&2
        return 1
    fi
    echo "check passed: router $router is $rtype"
}

# -------------------------------------------------------------------- main

main() {
    [ $# -ge 1 ] || {
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 2
    }
    local cmd=$1
    shift
    need_tools
    case $cmd in
    up) cmd_up "$@" ;;
    host) cmd_host "$@" ;;
    router) cmd_router "$@" ;;
    peer) cmd_peer "$@" ;;
    forward | unforward) cmd_forward "$cmd" "$@" ;;
    upnp) cmd_upnp "$@" ;;
    delay) cmd_delay "$@" ;;
    exec) cmd_exec "$@" ;;
    status) cmd_status "$@" ;;
    check) cmd_check "$@" ;;
    down) cmd_down "$@" ;;
    -h | --help | help) main ;;
    *) die "unknown command '$cmd' (up host router peer forward unforward upnp delay exec check status down)" ;;
    esac
}

main "$@"
