#!/usr/bin/env python3
"""Figures of a VpnGateway's inbound ports in a real `cloak lab` (prints them, asserts nothing).

Run by tools/bench-inbound.sh, which builds cloak and brings up the lab. As root, on the lab's
own namespaces only: every connection goes from the lab's internet namespace to a lab address.

  through cloak   a remote in the internet -> the provider's forwarded port (NAT-PMP) -> the
                  tunnel -> the exit's DNAT and masquerade -> the Service -> a backend pod
  kept address    the same, to a backend pod that is a client of the gateway: the exit's DNAT
                  straight to the pod over the link to its node, the remote's address kept,
                  the replies back through the client's veth, its node and the same link
  bare            the same remote -> a port the same provider forwards (asked by NAT-PMP from
                  inside the exit pod) -> the same tunnel -> a server in the exit pod itself:
                  the path without cloak's rules, the Service and the pod network

For each: one TCP stream of 200 MB (Mbit/s), and new connections for 5 s from 8 threads
(connections per second, each a connect, one byte back and a close). Then the renewal traffic
of one mapping, counted at the provider's NAT-PMP gateway.

Subcommands `backend`, `natpmp`, `send` and `connect` are the pieces that run inside namespaces.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gateway import GATEWAY, NS, Lab, read_all  # noqa: E402

HERE = os.path.abspath(__file__)
SINK, CONN = 9001, 9002
KEPT_SINK, KEPT_CONN = 9003, 9004
BARE_SINK, BARE_CONN = 9101, 9102


def backend(sink_port, conn_port):
    """A sink (reads to EOF, answers its figures) and a connection answerer (one byte, close)."""

    def sink(conn):
        total, first = 0, None
        while True:
            data = conn.recv(1 << 18)
            if not data:
                break
            first = first or time.monotonic()
            total += len(data)
        last = time.monotonic()
        conn.sendall(json.dumps({"bytes": total, "seconds": last - (first or last)}).encode())
        conn.close()

    def answer(conn):
        try:
            conn.sendall(b"x")
        except OSError:
            pass
        conn.close()

    def accept(port, handler):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(512)
        while True:
            conn, _ = s.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, args=(conn_port, answer), daemon=True).start()
    accept(sink_port, sink)


def natpmp(address, internal):
    """From the exit's tunnel address: one NAT-PMP TCP mapping of `internal`; prints the port."""
    gateway = address.rsplit(".", 1)[0] + ".1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((address, 0))
    s.settimeout(1)
    s.sendto(struct.pack(">BBHHHI", 0, 2, 0, internal, 0, 60), (gateway, 5351))
    data, _ = s.recvfrom(64)
    _, _, result, _, _, external, _ = struct.unpack(">BBHIHHI", data[:16])
    if result != 0:
        raise SystemExit(f"NAT-PMP result {result}")
    print(external)


def send(address, port, megabytes):
    s = socket.create_connection((address, port), timeout=10)
    block = b"\0" * (1 << 16)
    for _ in range(megabytes * 16):
        s.sendall(block)
    s.shutdown(socket.SHUT_WR)
    s.settimeout(60)
    print(read_all(s).decode())


def connect(address, port, seconds, threads):
    done, failed = [0], [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker():
        while time.monotonic() < end:
            try:
                c = socket.create_connection((address, port), timeout=2)
                c.recv(1)
                c.close()
                with lock:
                    done[0] += 1
            except OSError:
                with lock:
                    failed[0] += 1

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    print(json.dumps({"per_second": done[0] / seconds, "failed": failed[0]}))


def in_net(lab, *args, timeout=300):
    r = subprocess.run(["ip", "netns", "exec", lab.netns("net"), sys.executable, HERE, *args],
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"{args} from the internet: {r.stderr}")
    return r.stdout


def measure(lab, address, sink, conn):
    sent = json.loads(in_net(lab, "send", address, str(sink), "200"))
    rate = json.loads(in_net(lab, "connect", address, str(conn), "5", "8"))
    return sent["bytes"] * 8 / sent["seconds"] / 1e6, rate["per_second"], rate["failed"]


def main():
    cloak, name = sys.argv[2], sys.argv[3]
    lab = Lab(cloak, name)
    lab.healthy(2)
    lab.client("in-backend", labels="{app: in-backend}")
    service = (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: in-backend\n  namespace: {NS}\n"
               f"spec:\n  selector: {{app: in-backend}}\n  ports:\n"
               f"    - {{name: sink, port: {SINK}, protocol: TCP}}\n"
               f"    - {{name: conn, port: {CONN}, protocol: TCP}}\n")
    subprocess.run([cloak, "lab", "kubectl", "--name", name, "--", "apply", "-f", "-"],
                   input=service, text=True, check=True, capture_output=True)
    backend_pid = lab.pod_pid("in-backend")
    procs = [subprocess.Popen(["nsenter", "-t", backend_pid, "-n", sys.executable, HERE,
                               "backend", str(SINK), str(CONN)])]
    # A backend that is a client of the gateway: its Service's connections keep their address.
    lab.client("in-kept", labels=f"{{app: in-kept, cloak.dev/gateway: {GATEWAY}}}")
    kept_service = (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: in-kept\n"
                    f"  namespace: {NS}\nspec:\n  selector: {{app: in-kept}}\n  ports:\n"
                    f"    - {{name: sink, port: {KEPT_SINK}, protocol: TCP}}\n"
                    f"    - {{name: conn, port: {KEPT_CONN}, protocol: TCP}}\n")
    subprocess.run([cloak, "lab", "kubectl", "--name", name, "--", "apply", "-f", "-"],
                   input=kept_service, text=True, check=True, capture_output=True)
    procs.append(subprocess.Popen(["nsenter", "-t", lab.pod_pid("in-kept"), "-n",
                                   sys.executable, HERE, "backend", str(KEPT_SINK),
                                   str(KEPT_CONN)]))
    try:
        requested = time.monotonic()
        lab.kubectl("-n", NS, "patch", "vpngateway", GATEWAY, "--type=merge", "-p", json.dumps(
            {"spec": {"ports": [
                {"name": "sink", "service": "in-backend", "port": SINK, "protocol": "TCP"},
                {"name": "conn", "service": "in-backend", "port": CONN, "protocol": "TCP"},
                {"name": "ksink", "service": "in-kept", "port": KEPT_SINK, "protocol": "TCP"},
                {"name": "kconn", "service": "in-kept", "port": KEPT_CONN,
                 "protocol": "TCP"}]}}))

        def published():
            exits = lab.gateway().get("status", {}).get("exits", [])
            ok = [e for e in exits if len(e.get("ports", [])) == 4]
            return ok if len(ok) == 2 else None
        exits = lab.wait("both exits' ports published", published, 180)
        print(f"ports published {time.monotonic() - requested:.1f} s after the request "
              f"(the exit configs reach the pods through a mounted ConfigMap)")
        exit = exits[0]
        ports = {p["name"]: p["port"] for p in exit["ports"]}
        address = exit["publicAddress"]

        # The bare path: a server in the exit pod, on ports its provider forwards to it.
        exit_pid = lab.pod_pid(exit["name"])
        addrs = json.loads(subprocess.run(
            ["nsenter", "-t", exit_pid, "-n", "ip", "-j", "-4", "addr", "show"],
            capture_output=True, text=True, check=True).stdout)
        tunnel = next(a["addr_info"][0]["local"] for a in addrs
                      if a["ifname"] not in ("lo", "eth0", "ckx0") and a.get("addr_info"))
        procs.append(subprocess.Popen(["nsenter", "-t", exit_pid, "-n", sys.executable, HERE,
                                       "backend", str(BARE_SINK), str(BARE_CONN)]))
        bare = {}
        for internal in (BARE_SINK, BARE_CONN):
            bare[internal] = int(subprocess.run(
                ["nsenter", "-t", exit_pid, "-n", sys.executable, HERE, "natpmp", tunnel,
                 str(internal)], capture_output=True, text=True, check=True).stdout)
        time.sleep(1)

        print(f"inbound through exit {exit['name']} ({address}, userspace WireGuard, 2 cores):")
        via = measure(lab, address, ports["sink"], ports["conn"])
        kept = measure(lab, address, ports["ksink"], ports["kconn"])
        raw = measure(lab, address, bare[BARE_SINK], bare[BARE_CONN])
        print(f"  one TCP stream, 200 MB: through cloak {via[0]:.0f} Mbit/s, address kept "
              f"{kept[0]:.0f} Mbit/s, bare {raw[0]:.0f} Mbit/s; ratios {via[0] / raw[0]:.2f}x "
              f"and {kept[0] / raw[0]:.2f}x")
        print(f"  new connections, 8 threads for 5 s: through cloak {via[1]:.0f}/s "
              f"({via[2]} failed), address kept {kept[1]:.0f}/s ({kept[2]} failed), bare "
              f"{raw[1]:.0f}/s ({raw[2]} failed); ratios {via[1] / raw[1]:.2f}x and "
              f"{kept[1] / raw[1]:.2f}x")

        # Renewal traffic: the provider's gateway logs every request, with its source.
        provider = {"198.51.100.11": "wg-alpha", "198.51.100.12": "wg-beta"}[address]
        log = f"/var/lib/cloak/lab/{name}/providers/{provider}/natpmp.log"

        def count():
            with open(log) as f:
                return sum(1 for line in f
                           if f" {tunnel}:" in line and "Map(Map" in line
                           and f"internal: {BARE_SINK}," not in line
                           and f"internal: {BARE_CONN}," not in line)
        before, t0 = count(), time.monotonic()
        time.sleep(90)
        minutes = (time.monotonic() - t0) / 60
        per = (count() - before) / 4 / minutes
        print(f"  renewal traffic: {per:.1f} requests a minute per mapping (the exit's 4 mappings "
              f"over {minutes * 60:.0f} s, counted at the provider's gateway); a request is 12 "
              f"bytes and its answer 16, {per * (12 + 16 + 2 * (28 + 32)) / 60:.1f} bytes/s "
              f"with UDP/IP and WireGuard's own 32 each")
    finally:
        for p in procs:
            p.kill()
        lab.kubectl("-n", NS, "patch", "vpngateway", GATEWAY, "--type=merge",
                    "-p", '{"spec":{"ports":null}}', check=False)
        lab.delete("service", "in-backend", "in-kept")
        lab.delete("pod", "in-backend", "in-kept")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "backend":
        backend(int(sys.argv[2]), int(sys.argv[3]))
    elif cmd == "natpmp":
        natpmp(sys.argv[2], int(sys.argv[3]))
    elif cmd == "send":
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "connect":
        connect(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "run":
        main()
    else:
        raise SystemExit(__doc__)
