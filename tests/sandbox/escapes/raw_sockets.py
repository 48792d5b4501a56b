"""Sockets that bypass the IP stack's routing or cross namespaces: raw, packet, vsock, netlink."""
import socket

from _common import attempt, report

attempt("raw-inet-tcp", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
attempt("raw-inet-raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
attempt("raw-inet6-udp", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW,
                                               socket.IPPROTO_UDP))
attempt("packet-raw", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0x0300))
attempt("packet-dgram", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0x0300))
attempt("vsock-stream", lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM))
attempt("vsock-dgram", lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_DGRAM))
attempt("netlink-route", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))
attempt("netlink-netfilter", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12))
report()
