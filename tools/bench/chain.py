#!/usr/bin/env python3
"""Figures of the VpnChain in a real `cloak lab` (prints them, asserts nothing).

Run by tools/bench-chain.sh, which builds cloak and brings up the lab. As root, on the lab's own
namespaces only: every flow goes from a lab pod to the lab's internet namespace. The chain is the
lab's example `onion` (examples/lab/60-chain.yaml: wg-alpha, wg-beta, ovpn-gamma).

  throughput   one TCP stream from a chain client through the 3-hop chain, against the same
               stream through the same chain cut to its first hop (1 hop, same implementation),
               and sent from inside hop 1's exit pod straight into its tunnel (the bare tunnel)
  repair       drills per hop position: the internet drops everything to and from the hop's
               server; the time until the hop is declared down (its gateway's status), until it
               has moved to its pool's next server, and until a new flow from the client passes
               again (one started every 0.5 s, each given 2 s)
  cost         RSS and CPU of each hop's processes (its agent; OpenVPN too for an OpenVPN hop)

The pieces that run inside namespaces (`serve`, `send`) are tools/bench/gateway.py's.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gateway as gw  # noqa: E402  (the shared pieces)

CHAIN = "onion"
HOP_SERVERS = {"chain-alpha": (1, "wg"), "chain-beta": (2, "wg"), "chain-gamma": (3, "ovpn")}


def chain(lab):
    return lab.json("-n", gw.NS, "get", "vpnchain", CHAIN)


def healthy(lab, hops, limit=300):
    def check():
        c = chain(lab)
        s = c.get("status", {})
        ok = (s.get("healthyHops") == hops and len(s.get("hops", [])) == hops
              and s.get("publicAddress"))
        return c if ok else None
    return lab.wait(f"chain with {hops} healthy hops", check, limit)


def set_hops(lab, count):
    hops = [{"providers": [f"chain-{k}"]} for k in range(1, count + 1)]
    lab.kubectl("-n", gw.NS, "patch", "vpnchain", CHAIN, "--type=merge",
                "-p", json.dumps({"spec": {"hops": hops}}))


def rate(report):
    return report["bytes"] * 8 / report["seconds"] / 1e6  # Mbit/s, 10^6 bits


def send_until(lab, pod, megabytes, peer, limit=60):
    """One stream from `pod` once a stream leaves with the address `peer` (the client's
    re-attachment after a change of hops takes a sweep)."""
    end = time.monotonic() + limit
    while True:
        try:
            r = json.loads(lab.in_pod(pod, "send", str(megabytes), timeout=120))
            if r["peer"] == peer:
                return r
        except SystemExit:
            pass
        if time.monotonic() > end:
            raise SystemExit(f"no stream from {pod} left with {peer}")
        time.sleep(1)


def hop_pod(k):
    return f"{CHAIN}-hop-{k}-exit-0"


def bench_throughput(lab, megabytes):
    print(f"throughput (one TCP stream, {megabytes} MB, 2 cores):")
    three = healthy(lab, 3)
    via3 = send_until(lab, "cbench", megabytes, three["status"]["publicAddress"])
    set_hops(lab, 1)
    one = healthy(lab, 1)
    via1 = send_until(lab, "cbench", megabytes, one["status"]["publicAddress"])
    bare = json.loads(lab.in_pod(hop_pod(1), "send", str(megabytes)))
    set_hops(lab, 3)
    healthy(lab, 3)
    print(f"  3 hops (WireGuard, WireGuard, OpenVPN) {rate(via3):.0f} Mbit/s; 1 hop (WireGuard) "
          f"{rate(via1):.0f} Mbit/s; ratio {rate(via3) / rate(via1):.2f}x; bare hop-1 tunnel from "
          f"its exit pod {rate(bare):.0f} Mbit/s")


def new_flow_ok(pid):
    """One new flow from the client's namespace: whether the echo service answered in 2 s."""
    r = subprocess.run(["nsenter", "-t", pid, "-n", sys.executable, "-c",
                        "import socket,sys\n"
                        "try:\n"
                        f" s=socket.create_connection(('{gw.ECHO}',80),timeout=2);s.settimeout(2)\n"
                        " s.sendall(b'GET /ip HTTP/1.0\\r\\n\\r\\n');d=s.recv(4096)\n"
                        " sys.exit(0 if d else 1)\n"
                        "except OSError:\n sys.exit(1)\n"],
                       capture_output=True, timeout=10)
    return r.returncode == 0


def drill(lab, k):
    c = healthy(lab, 3)
    hop = c["status"]["hops"][k - 1]
    index, _ = HOP_SERVERS[hop["provider"]]
    number = int(hop["server"].removeprefix("server-"))
    server = f"192.0.2.{10 * index + number}"
    script = (f"table ip chainbench {{\n chain f {{\n  type filter hook forward priority -400;"
              f" policy accept;\n  ip daddr {server} drop\n  ip saddr {server} drop\n }}\n}}\n")
    pid = lab.pod_pid("cbench")
    subprocess.run(["ip", "netns", "exec", lab.netns("net"), "nft", "-f", "-"], input=script,
                   text=True, check=True)
    t0 = time.monotonic()
    declared = moved = back = None
    seen_down = False
    try:
        while time.monotonic() - t0 < 180:
            now = time.monotonic() - t0
            h = chain(lab)["status"]["hops"][k - 1]
            if declared is None and h["health"] != "Healthy":
                declared = now
            if moved is None and h.get("server") != hop["server"]:
                moved = now
            ok = new_flow_ok(pid)
            seen_down = seen_down or not ok
            if moved is not None and ok and seen_down:
                back = time.monotonic() - t0
                break
            time.sleep(0.5)
    finally:
        subprocess.run(["ip", "netns", "exec", lab.netns("net"), "nft", "delete", "table", "ip",
                        "chainbench"], check=False)
    return declared, moved, back


def bench_repair(lab, drills):
    move_after = chain(lab)["spec"].get("moveAfter", "30s")
    print(f"repair (moveAfter {move_after}; a hop's server dropped by the internet until the hop "
          f"moved):")
    for k in (1, 2, 3):
        results = [drill(lab, k) for _ in range(drills)]
        kind = HOP_SERVERS[chain(lab)["status"]["hops"][k - 1]["provider"]][1]

        def fig(values):
            v = [x for x in values if x is not None]
            return (f"median {statistics.median(v):.1f} s, max {max(v):.1f} s" if v else "-") + (
                f", {len(values) - len(v)} never" if len(v) < len(values) else "")
        print(f"  hop {k} ({kind}), {drills} drills: declared down {fig([r[0] for r in results])};"
              f" moved {fig([r[1] for r in results])}; traffic again {fig([r[2] for r in results])}")


def bench_cost(lab):
    hz = os.sysconf("SC_CLK_TCK")
    pids = {k: lab.pod_processes(gw.NS, hop_pod(k)) for k in (1, 2, 3)}
    before = {k: [gw.rss_cpu(q) for q in v] for k, v in pids.items()}
    pid = lab.pod_pid("cbench")
    load = subprocess.Popen(["nsenter", "-t", pid, "-n", sys.executable, gw.HERE, "send", "100"],
                            stdout=subprocess.PIPE, text=True)
    t = time.monotonic()
    report = json.loads(load.communicate()[0])
    span = time.monotonic() - t
    print(f"cost (during one {rate(report):.0f} Mbit/s stream through the chain, {span:.0f} s):")
    for k, v in pids.items():
        after = [gw.rss_cpu(q) for q in v]
        rss = sum(a[0] for a in after)
        cpu = sum(a[1] - b[1] for a, b in zip(after, before[k])) / hz / span * 100
        names = "+".join(sorted({gw.comm(q) or "?" for q in v}))
        print(f"  hop {k} ({names}): RSS {rss / 1024:.1f} MiB, CPU {cpu:.0f} % of one core")


def main():
    cloak, name, drills = sys.argv[2], sys.argv[3], int(sys.argv[4])
    parts = os.environ.get("BENCH_PARTS", "throughput,repair,cost").split(",")
    lab = gw.Lab(cloak, name)
    server = subprocess.Popen(["ip", "netns", "exec", lab.netns("net"), sys.executable, gw.HERE,
                               "serve"])
    try:
        healthy(lab, 3)
        lab.client("cbench", labels=f"{{app: chain-bench, cloak.dev/chain: {CHAIN}}}")
        if "throughput" in parts:
            bench_throughput(lab, 100)
        if "cost" in parts:
            bench_cost(lab)
        if "repair" in parts:
            bench_repair(lab, drills)
    finally:
        server.kill()
        lab.delete("pod", "cbench")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        main()
    else:
        raise SystemExit(__doc__)
