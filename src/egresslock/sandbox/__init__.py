"""The kernel-enforced sandbox of ``egresslock run``: namespaces, nftables, seccomp, Landlock."""
