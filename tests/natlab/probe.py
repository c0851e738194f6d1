#!/usr/bin/env python3
"""NAT probe for the NAT lab (tests/natlab/lab.sh): a STUN-like observer and a client
that classifies the NAT in front of it. Standard library only.

  probe.py observe --ports 3478,3479 [--ready-file F]
      Serves UDP and TCP on every port (all addresses). Requests are JSON (one
      datagram, or one line on a TCP connection):
        {"op":"map"}                      -> replies the source ip:port it saw
        {"op":"send","token":T[,"from_port":P][,"to":"ip:port"]}
              UDP: sends T three times from local port P (default: the port asked)
              TCP: connects from local port P (default: ephemeral) and sends T
              to "to" (default: the requester's address as seen here)
        {"op":"relay","via":"ip:port","req":{...}}
              passes req (with "to" filled in with the requester's address) to
              another observer, so that observer contacts the client without the
              client ever having sent to it.

  probe.py client --a IP --b IP [--ports 3478,3479] [--port L] [--wait 0.4]
      From one local port L (UDP socket; TCP listener plus connections, all with
      SO_REUSEADDR/SO_REUSEPORT as libp2p does) it
        1. asks observer A (first port) for its mapped address;
        2. asks A to send from its other port, and A to have B send (B never
           contacted): does either reach L?  (filtering)
        3. asks A's other port (UDP only; TCP would clash with 2's connection),
           B's ports for the mapped address  (mapping).
      UDP and TCP run side by side; step 3 starts for both only after step 2 is
      over for both, since the address-restricted router's list of contacted
      addresses is shared between protocols. Prints one JSON object.

  probe.py flatten < result.json
      Prints the JSON as key=value lines (dotted keys), for shell scripts.
"""

import argparse
import json
import os
import secrets
import socket
import sys
import threading
import time

REUSE = [(socket.SOL_SOCKET, socket.SO_REUSEADDR)]
if hasattr(socket, "SO_REUSEPORT"):
    REUSE.append((socket.SOL_SOCKET, socket.SO_REUSEPORT))


def reuse(sock):
    for level, opt in REUSE:
        sock.setsockopt(level, opt, 1)
    return sock


def fmt(addr):
    return f"{addr[0]}:{addr[1]}"


def parse(addr):
    host, _, port = addr.rpartition(":")
    return host, int(port)


# --------------------------------------------------------------------- observer


class Observer:
    def __init__(self, ports):
        self.ports = ports
        self.udp = {}
        self.tcp = {}
        for port in ports:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(("0.0.0.0", port))
            self.udp[port] = u
            t = reuse(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            t.bind(("0.0.0.0", port))
            t.listen(64)
            self.tcp[port] = t

    def start(self):
        for port in self.ports:
            threading.Thread(target=self.udp_loop, args=(port,), daemon=True).start()
            threading.Thread(target=self.tcp_loop, args=(port,), daemon=True).start()

    # UDP
    def udp_loop(self, port):
        sock = self.udp[port]
        while True:
            try:
                data, src = sock.recvfrom(4096)
                msg = json.loads(data)
                self.udp_handle(port, sock, msg, src)
            except Exception as e:  # a bad request must not stop the observer
                log(f"udp {port}: {e!r}")

    def udp_handle(self, port, sock, msg, src):
        op = msg.get("op")
        if op == "map":
            reply = {"op": "mapped", "id": msg.get("id"), "addr": fmt(src), "port": port}
            sock.sendto(json.dumps(reply).encode(), src)
        elif op == "send":
            to = parse(msg["to"]) if msg.get("to") else src
            out = self.udp.get(int(msg.get("from_port") or port))
            if out is None:
                return
            body = json.dumps({"op": "token", "token": msg.get("token")}).encode()

            def burst():
                for _ in range(3):
                    out.sendto(body, to)
                    time.sleep(0.03)

            threading.Thread(target=burst, daemon=True).start()
        elif op == "relay":
            req = dict(msg["req"])
            req.setdefault("to", fmt(src))
            sock.sendto(json.dumps(req).encode(), parse(msg["via"]))

    # TCP
    def tcp_loop(self, port):
        lst = self.tcp[port]
        while True:
            try:
                conn, src = lst.accept()
                threading.Thread(target=self.tcp_conn, args=(port, conn, src), daemon=True).start()
            except Exception as e:
                log(f"tcp {port}: {e!r}")

    def tcp_conn(self, port, conn, src):
        try:
            conn.settimeout(30)
            f = conn.makefile("rb")
            for line in f:
                if not line.strip():
                    continue
                msg = json.loads(line)
                op = msg.get("op")
                if op == "map":
                    conn.sendall((json.dumps({"op": "mapped", "addr": fmt(src), "port": port}) + "\n").encode())
                elif op == "send":
                    to = parse(msg["to"]) if msg.get("to") else src
                    args = (to, msg.get("from_port"), msg.get("token"), float(msg.get("timeout", 0.4)))
                    threading.Thread(target=self.tcp_connect_back, args=args, daemon=True).start()
                elif op == "relay":
                    req = dict(msg["req"])
                    req.setdefault("to", fmt(src))
                    threading.Thread(target=self.tcp_relay, args=(parse(msg["via"]), req), daemon=True).start()
        except Exception as e:
            log(f"tcp {port} conn {fmt(src)}: {e!r}")
        finally:
            conn.close()

    @staticmethod
    def tcp_connect_back(to, from_port, token, timeout):
        s = reuse(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        try:
            if from_port:
                s.bind(("0.0.0.0", int(from_port)))
            # Shorter than the first SYN retransmission (1 s): a SYN the NAT dropped
            # must not come again later, once the client has contacted us.
            s.settimeout(min(timeout, 0.9))
            s.connect(to)
            s.sendall((json.dumps({"op": "token", "token": token}) + "\n").encode())
            time.sleep(0.2)
        except OSError:
            pass
        finally:
            s.close()

    @staticmethod
    def tcp_relay(via, req):
        try:
            with socket.create_connection(via, timeout=2) as s:
                s.sendall((json.dumps(req) + "\n").encode())
                time.sleep(0.2)
        except OSError as e:
            log(f"relay to {fmt(via)}: {e!r}")


def log(text):
    print(f"probe: {text}", file=sys.stderr, flush=True)


def cmd_observe(args):
    ports = [int(p) for p in args.ports.split(",")]
    obs = Observer(ports)
    obs.start()
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, args.ready_file)
    log(f"observing udp+tcp on {ports}")
    while True:
        time.sleep(3600)


# ----------------------------------------------------------------------- client


def classify_mapping(m):
    """m: label -> "ip:port" (labels a1, a2, b1, b2; missing ones absent)."""
    vals = [v for v in m.values() if v]
    if len(vals) < len(m) or len(vals) < 2:
        return "unknown"
    if len(set(vals)) == 1:
        return "endpoint-independent"
    a = {m[k] for k in ("a1", "a2") if k in m}
    b = {m[k] for k in ("b1", "b2") if k in m}
    if len(a) == 1 and len(b) == 1:
        return "address-dependent"
    return "address-and-port-dependent"


def classify_filtering(open_a, open_b):
    if open_a and open_b:
        return "endpoint-independent"
    if open_a:
        return "address-dependent"
    if not open_b:
        return "address-and-port-dependent"
    return "inconsistent"


class Client:
    def __init__(self, a, b, ports, port, wait):
        self.a, self.b = a, b
        self.p1, self.p2 = ports[0], ports[1]
        self.wait = wait
        self.barrier = threading.Barrier(2, timeout=30)
        self.port, self.udp, self.lst = self.bind(port)

    @staticmethod
    def bind(port):
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("0.0.0.0", port or 0))
            p = udp.getsockname()[1]
            lst = reuse(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                lst.bind(("0.0.0.0", p))
                lst.listen(16)
                return p, udp, lst
            except OSError:
                udp.close()
                lst.close()
                if port:
                    raise
        raise OSError("no local port free for both UDP and TCP")

    # UDP ------------------------------------------------------------------
    def run_udp(self):
        r = {"mapped": {}, "errors": [], "tokens": {}}
        s, seen, ids = self.udp, {}, iter(range(1, 1 << 30))

        def pump(until, want_id=None, done=None):
            """Receives until `until` (or done() holds); returns the mapped reply with want_id."""
            while not (done and done()):
                left = until - time.monotonic()
                if left <= 0:
                    return None
                s.settimeout(left)
                try:
                    data, src = s.recvfrom(4096)
                except socket.timeout:
                    return None
                try:
                    msg = json.loads(data)
                except ValueError:
                    continue
                if msg.get("op") == "token":
                    seen.setdefault(msg.get("token"), fmt(src))
                elif msg.get("op") == "mapped" and want_id is not None and msg.get("id") == want_id:
                    return msg["addr"]

        def mapped(host, port):
            for _ in range(5):
                i = next(ids)
                s.sendto(json.dumps({"op": "map", "id": i}).encode(), (host, port))
                got = pump(time.monotonic() + 0.25, i)
                if got:
                    return got
            r["errors"].append(f"udp: no answer from {host}:{port}")
            return None

        try:
            r["mapped"]["a1"] = mapped(self.a, self.p1)
            ta, tb = secrets.token_hex(6), secrets.token_hex(6)
            if r["mapped"]["a1"]:
                a1 = (self.a, self.p1)
                for _ in range(2):  # requests are idempotent; guard against a loss
                    s.sendto(json.dumps({"op": "send", "from_port": self.p2, "token": ta}).encode(), a1)
                    relay = {"op": "relay", "via": f"{self.b}:{self.p1}", "req": {"op": "send", "token": tb}}
                    s.sendto(json.dumps(relay).encode(), a1)
                pump(time.monotonic() + self.wait, done=lambda: ta in seen and tb in seen)
            r["open_a_other_port"] = ta in seen
            r["open_b"] = tb in seen
            r["tokens"] = {"a_other_port": seen.get(ta), "b": seen.get(tb)}
        finally:
            self.barrier.wait()
        r["mapped"]["a2"] = mapped(self.a, self.p2)
        r["mapped"]["b1"] = mapped(self.b, self.p1)
        r["mapped"]["b2"] = mapped(self.b, self.p2)
        return r

    # TCP ------------------------------------------------------------------
    def tcp_map(self, host, port, r):
        s = reuse(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        try:
            s.bind(("0.0.0.0", self.port))
            s.settimeout(3)
            s.connect((host, port))
            s.sendall(b'{"op":"map"}\n')
            f = s.makefile("rb")
            return s, json.loads(f.readline())["addr"]
        except (OSError, ValueError, KeyError) as e:
            r["errors"].append(f"tcp: map via {host}:{port}: {e!r}")
            s.close()
            return None, None

    def run_tcp(self):
        r = {"mapped": {}, "errors": [], "tokens": {}}
        conns, seen = [], {}
        try:
            c1, r["mapped"]["a1"] = self.tcp_map(self.a, self.p1, r)
            ta, tb = secrets.token_hex(6), secrets.token_hex(6)
            if c1:
                conns.append(c1)
                req_a = {"op": "send", "from_port": self.p2, "token": ta, "timeout": self.wait}
                req_b = {"op": "send", "token": tb, "timeout": self.wait}
                relay = {"op": "relay", "via": f"{self.b}:{self.p1}", "req": req_b}
                c1.sendall((json.dumps(req_a) + "\n" + json.dumps(relay) + "\n").encode())
                until = time.monotonic() + self.wait
                while (left := until - time.monotonic()) > 0 and not (ta in seen and tb in seen):
                    self.lst.settimeout(left)
                    try:
                        conn, src = self.lst.accept()
                    except socket.timeout:
                        break
                    conns.append(conn)
                    conn.settimeout(1)
                    try:
                        msg = json.loads(conn.makefile("rb").readline())
                        seen.setdefault(msg.get("token"), fmt(src))
                    except (OSError, ValueError):
                        pass
            r["open_a_other_port"] = ta in seen
            r["open_b"] = tb in seen
            r["tokens"] = {"a_other_port": seen.get(ta), "b": seen.get(tb)}
        finally:
            self.barrier.wait()
        try:
            # Not A's other port: a connection from it may be open already (cone NATs).
            for label, host, port in (("b1", self.b, self.p1), ("b2", self.b, self.p2)):
                c, r["mapped"][label] = self.tcp_map(host, port, r)
                if c:
                    conns.append(c)
        finally:
            for c in conns:
                c.close()
        return r

    def run(self):
        out = {}

        def go(name, fn):
            try:
                out[name] = fn()
            except Exception as e:
                out[name] = {"mapped": {}, "errors": [f"{name}: {e!r}"]}

        threads = [
            threading.Thread(target=go, args=("udp", self.run_udp)),
            threading.Thread(target=go, args=("tcp", self.run_tcp)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.udp.close()
        self.lst.close()
        local_ip = local_address(self.a)
        result = {
            "local": f"{local_ip}:{self.port}",
            "observers": {"a": self.a, "b": self.b, "ports": [self.p1, self.p2]},
            "errors": [],
        }
        for proto in ("udp", "tcp"):
            r = out[proto]
            m = r["mapped"]
            r["mapping"] = classify_mapping(m)
            r["filtering"] = classify_filtering(r.get("open_a_other_port"), r.get("open_b"))
            vals = [v for v in m.values() if v]
            r["mapped_ips"] = sorted({parse(v)[0] for v in vals})
            r["mapped_ports"] = [parse(m[k])[1] if m.get(k) else None for k in sorted(m)]
            r["translated"] = any(v != result["local"] for v in vals)
            result["errors"] += r.pop("errors")
            result[proto] = r
        result["nat_type"] = nat_type(result["udp"])
        result["tcp"]["nat_type"] = nat_type(result["tcp"])
        return result


def nat_type(r):
    if r["mapping"] == "unknown":
        return "unknown"
    if not r["translated"]:
        return "none"
    if r["mapping"] != "endpoint-independent":
        return "symmetric"
    return {
        "endpoint-independent": "full-cone",
        "address-dependent": "address-restricted",
        "address-and-port-dependent": "port-restricted",
    }.get(r["filtering"], "unknown")


def local_address(toward):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((toward, 9))
        return s.getsockname()[0]
    except OSError:
        return "0.0.0.0"
    finally:
        s.close()


def cmd_client(args):
    ports = [int(p) for p in args.ports.split(",")]
    if len(ports) != 2:
        sys.exit("probe: --ports takes two ports")
    result = Client(args.a, args.b, ports, args.port, args.wait).run()
    print(json.dumps(result, indent=None if args.compact else 2, sort_keys=True))
    return 1 if result["errors"] else 0


def flatten(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from flatten(v, f"{prefix}{k}.")
    elif isinstance(value, list):
        yield prefix[:-1], ",".join("" if v is None else str(v) for v in value)
    else:
        if isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = "" if value is None else str(value)
        yield prefix[:-1], text.replace("\n", " ")


def cmd_flatten(_args):
    for k, v in flatten(json.load(sys.stdin)):
        print(f"{k}={v}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("observe", help="serve as an observer (UDP and TCP)")
    o.add_argument("--ports", default="3478,3479")
    o.add_argument("--ready-file", help="written once every socket is bound")
    c = sub.add_parser("client", help="classify the NAT in front of this host")
    c.add_argument("--a", required=True, help="observer A's address")
    c.add_argument("--b", required=True, help="observer B's address (another host)")
    c.add_argument("--ports", default="3478,3479", help="the observers' two ports")
    c.add_argument("--port", type=int, default=0, help="local port (default: any free one)")
    c.add_argument("--wait", type=float, default=0.4, help="seconds to wait for unsolicited packets")
    c.add_argument("--compact", action="store_true", help="JSON on one line")
    sub.add_parser("flatten", help="JSON on stdin to key=value lines")
    args = ap.parse_args()
    return {"observe": cmd_observe, "client": cmd_client, "flatten": cmd_flatten}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
