# The lab's "internet": answers every request with the source address it saw (what a
# what-is-my-IP service does), over TCP (port 7, on connect), HTTP (port 80), UDP (port 7) and
# DNS (port 53/udp: an A or AAAA record holding the source address, for any name); TCP port 9
# sends the address, then echoes whatever comes until the client closes (a long flow).
# Usage: echo.py ADDRESS... (the local addresses to answer UDP on)
import socket, struct, sys, threading

def tcp(port, http, stream=False):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(128)
    def serve(c, addr):
        ip = addr[0].removeprefix("::ffff:")
        try:
            if http:
                c.settimeout(2); c.recv(4096)
                body = ip + "\n"
                c.sendall(("HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)).encode())
            else:
                c.sendall((ip + "\n").encode())
                while stream:
                    data = c.recv(65536)
                    if not data: break
                    c.sendall(data)
        except OSError:
            pass
        c.close()
    while True:
        c, addr = s.accept()
        threading.Thread(target=serve, args=(c, addr), daemon=True).start()

def udp(addr, port, dns):
    # One socket per address: a wildcard socket would answer from whichever address routing
    # picks, which the client's NAT would not recognise.
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    while True:
        data, addr = s.recvfrom(4096)
        ip = addr[0].removeprefix("::ffff:")
        if not dns:
            s.sendto((ip + "\n").encode(), addr); continue
        if len(data) < 12: continue
        qid = data[:2]
        end = 12
        while end < len(data) and data[end] != 0: end += 1 + data[end]
        question = data[12:end + 5]
        if ":" in ip:
            rtype, rdata = 28, socket.inet_pton(socket.AF_INET6, ip)
        else:
            rtype, rdata = 1, socket.inet_aton(ip)
        answer = b"\xc0\x0c" + struct.pack(">HHIH", rtype, 1, 0, len(rdata)) + rdata
        s.sendto(qid + b"\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00" + question + answer, addr)

jobs = [(tcp, (7, False)), (tcp, (80, True)), (tcp, (9, False, True))]
for addr in sys.argv[1:]:
    jobs += [(udp, (addr, 7, False)), (udp, (addr, 53, True))]
for target, args in jobs:
    threading.Thread(target=target, args=args, daemon=True).start()
import time; time.sleep(0.2)
print("ready", flush=True)
threading.Event().wait()
