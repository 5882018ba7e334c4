#!/bin/bash
# A measurement prototype for the VpnGateway design (docs/architecture.md), not a test and not
# cloak code: it builds the planned data path by hand, prints how 100 flows spread over the
# exits, then runs "$@" with the namespaces up (the helpers x, ruleset and drill are exported;
# "$@" itself runs in the caller's namespace), and removes every namespace it made on the way
# out. Root. The script itself touches nothing of the host: every address, sysctl and rule is in
# a gwp-* namespace, and traffic stays inside them. It removes any gwp-* namespace it finds at
# start, another run's included: run one at a time.
#
#   tools/prototypes/gateway-datapath.sh
#   tools/prototypes/gateway-datapath.sh drill      # an exit taken out 5 times, timed
#   tools/prototypes/gateway-datapath.sh bash -c 'ruleset 1 3 | x node nft -f -'
#
# The planned path, in throwaway namespaces (all named gwp-*):
#   client --veth ckg0--> node --vxlan (per exit)--> exitN --veth--> inet (echo)
# The node hashes new flows over healthy exits (ct mark from a numgen map), routes by mark into
# that exit's vxlan link, masquerades to its transit address; exits learn the node's VTEP.
set -euo pipefail
P=gwp
cleanup() { set +e; for n in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do
  for pid in $(ip netns pids "$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  ip netns del "$n"; done; }
trap cleanup EXIT
cleanup
N=${EXITS:-3}
for ns in client node inet pod; do ip netns add $P-$ns; done
for i in $(seq 1 $N); do ip netns add $P-exit$i; done
x() { local ns=$1; shift; ip netns exec $P-$ns "$@"; }
for ns in client node inet pod $(seq -f exit%g 1 $N); do x $ns ip link set lo up; done
# underlay ("pod network"): node and exits on a bridge in ns pod, 10.244.0.0/24
x pod ip link add br0 type bridge; x pod ip link set br0 up
ip -n $P-node link add eth0 type veth peer name n0 netns $P-pod
x node ip addr add 10.244.0.10/24 dev eth0; x node ip link set eth0 up
x pod ip link set n0 master br0 up
for i in $(seq 1 $N); do
  ip -n $P-exit$i link add eth0 type veth peer name e$i netns $P-pod
  x exit$i ip addr add 10.244.0.$((20+i))/24 dev eth0; x exit$i ip link set eth0 up
  x pod ip link set e$i master br0 up
  # the exit's "tunnel": a veth to inet with its own public address 203.0.113.i
  ip -n $P-exit$i link add tun0 type veth peer name x$i netns $P-inet
  x exit$i ip addr add 198.18.$i.2/24 dev tun0; x exit$i ip link set tun0 up
  x inet ip addr add 198.18.$i.1/24 dev x$i; x inet ip link set x$i up
  x exit$i ip route add default via 198.18.$i.1 dev tun0
  x exit$i sysctl -qw net.ipv4.ip_forward=1
  # exit side of the overlay: one vxlan, learning, fixed source port
  x exit$i ip link add vx0 type vxlan id $i local 10.244.0.$((20+i)) dstport 4790 srcport 4790 4791 dev eth0
  x exit$i ip addr add 100.127.$i.1/24 dev vx0; x exit$i ip link set vx0 up
  x exit$i nft -f - <<NFT
table ip cloak {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "tun0" masquerade
  }
}
NFT
done
x inet ip addr add 203.0.113.1/32 dev lo
# client <-> node veth (ckg0)
ip -n $P-client link add ckg0 type veth peer name ckg-c1 netns $P-node
x client ip addr add 10.244.1.5/32 dev ckg0; x client ip link set ckg0 up
x client ip route add 169.254.1.1 dev ckg0; x client ip route add default via 169.254.1.1 dev ckg0
x node ip link set ckg-c1 up; x node ip route add 10.244.1.5/32 dev ckg-c1
x node sysctl -qw net.ipv4.ip_forward=1
x node sysctl -qw net.ipv4.conf.all.rp_filter=0
x node sysctl -qw net.ipv4.conf.default.rp_filter=0
x node ip addr add 169.254.1.1/32 dev ckg-c1
x node sh -c 'echo 1 > /proc/sys/net/ipv4/conf/ckg-c1/proxy_arp'
# node side: one vxlan per exit (p2p), table per exit, rule by mark
for i in $(seq 1 $N); do
  x node ip link add vx$i type vxlan id $i local 10.244.0.10 remote 10.244.0.$((20+i)) dstport 4790 srcport 4790 4791 dev eth0
  x node ip addr add 100.127.$i.10/24 dev vx$i; x node ip link set vx$i up
  x node ip route add default via 100.127.$i.1 dev vx$i table $((100+i))
  # VXLAN routes its outer packet with the inner packet's mark: without this rule the outer
  # packet follows the mark into its own link (a loop the kernel drops as a TX error).
  x node ip rule add to 10.244.0.$((20+i)) lookup main priority 900
  x node ip rule add fwmark $i lookup $((100+i)) priority $((1000+i))
done
healthy() { # the map of healthy exits: "0 : 1, 1 : 3"
  local list=("$@"); local out=""; local k=0
  for e in "${list[@]}"; do out+="$k : $e, "; k=$((k+1)); done
  echo "${#list[@]}|${out%, }"; }
ruleset() { # $@ = healthy exits; none: client traffic is refused at once
  local pick=""
  if [ "$#" -gt 0 ]; then
    IFS='|' read -r count elems < <(healthy "$@")
    pick="iifname \"ckg-*\" ct state new ct mark 0 ct mark set numgen random mod $count map { $elems }"
  fi
  cat <<NFT
table ip cloakgw
delete table ip cloakgw
table ip cloakgw {
  chain pre {
    type filter hook prerouting priority mangle; policy accept;
    $pick
    iifname "ckg-*" meta mark set ct mark
  }
  chain forwarding {
    type filter hook forward priority filter; policy drop;
    iifname "ckg-*" oifname "vx*" accept
    iifname "vx*" oifname "ckg-*" ct state established,related accept
    iifname "ckg-*" meta l4proto tcp reject with tcp reset
    iifname "ckg-*" reject with icmp type admin-prohibited
  }
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "vx*" masquerade
  }
}
NFT
}
ruleset $(seq 1 $N) | x node nft -f -
echo "built: $N exits"
# echo server: report source address
x inet python3 -c '
import socket,threading
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(("203.0.113.1",7)); s.listen(512)
def h(c,a):
  try:
    c.sendall((a[0]+"\n").encode())
    while True:
      d=c.recv(65536)
      if not d: break
      c.sendall(d)
  except Exception: pass
  c.close()
while True:
  c,a=s.accept(); threading.Thread(target=h,args=(c,a),daemon=True).start()
' &
sleep 0.5
spread() { x client python3 -c '
import socket,collections
c=collections.Counter()
for i in range(int(__import__("os").environ.get("FLOWS","100"))):
  s=socket.create_connection(("203.0.113.1",7),timeout=2); c[s.recv(64).decode().strip()]+=1; s.close()
print(dict(c))'; }
echo "spread of 100 flows: $(spread 2>&1 | tail -1)"
# One failover drill, five times: a long flow runs on one exit (echoes every 20 ms) while another
# exit is taken out of the node's map and its flows' conntrack entries are deleted (their next
# packet is then a new flow on another exit, which the server answers with a reset). Prints the
# time of those two commands, and the longest time between two echoes of the long flow.
drill() {
  x client python3 -c "
import socket,time
s=socket.create_connection(('203.0.113.1',7),timeout=2); via=s.recv(64).decode().strip()
open('/tmp/gwp-via','w').write(via.split('.')[2])
worst=0; last=time.time(); end=last+4
while time.time()<end:
  s.sendall(b'x'*100); s.recv(100); now=time.time(); worst=max(worst,now-last); last=now; time.sleep(0.02)
print('long flow via',via,': longest time between echoes %.1f ms (sends every 20 ms)'%(worst*1000))
" &
  local flow=$!
  sleep 0.5
  local v o others k s e
  v=$(cat /tmp/gwp-via); o=$(( v % N + 1 )); echo "long flow on exit $v; exit $o taken out"
  others=$(for i in $(seq 1 $N); do [ "$i" != "$o" ] && echo -n "$i "; done)
  for k in 1 2 3 4 5; do
    s=$(date +%s%N); ruleset $others | x node nft -f -; x node conntrack -D --mark "$o" >/dev/null 2>&1 || true; e=$(date +%s%N)
    echo "map update + conntrack deletion: $(( (e-s)/1000000 )) ms"
    ruleset $(seq 1 $N) | x node nft -f -
  done
  wait "$flow"; rm -f /tmp/gwp-via
}
export -f ruleset healthy x drill 2>/dev/null || true
export N
export P
"${@:-true}"
