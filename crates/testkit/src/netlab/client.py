# Asks the lab's internet which source address it saw: client.py tcp|http|udp|dns HOST PORT TIMEOUT
# Prints the address, or "error: <reason>" and exits 1.
import socket, struct, sys
mode, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
try:
    if mode in ("tcp", "http"):
        s = socket.socket(family, socket.SOCK_STREAM); s.settimeout(timeout); s.connect((host, port))
        if mode == "http": s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk: break
            data += chunk
        print(data.decode().split("\r\n\r\n")[-1].strip())
    elif mode == "udp":
        s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(timeout)
        s.sendto(b"hi", (host, port)); print(s.recv(4096).decode().strip())
    elif mode == "dns":
        s = socket.socket(family, socket.SOCK_DGRAM); s.settimeout(timeout)
        q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x06whoami\x04test\x00" + b"\x00\x01\x00\x01"
        s.sendto(q, (host, port)); r = s.recv(4096)
        rdlen = struct.unpack(">H", r[-6:-4])[0] if r[-6:-4] else 0
        rdata = r[-4:] if len(r) >= 4 else b""
        print(socket.inet_ntoa(rdata))
except Exception as e:
    print("error: %s" % e); sys.exit(1)
