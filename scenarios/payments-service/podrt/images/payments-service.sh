#!/bin/sh
# The payments workload: allocate and touch HEAP_MIB MiB, then serve /healthz on $PORT while holding it.
# awk builds one distinct 1 MiB string per MiB (concatenating the index defeats sharing), so every page is
# written and charged to this container's cgroup; past memory.max the kernel OOM-kills it.
mkdir -p /srv/payments && echo ok >/srv/payments/healthz
echo "payments: allocating ${HEAP_MIB:-150} MiB"
exec awk -v mib="${HEAP_MIB:-150}" -v port="${PORT:-8081}" 'BEGIN {
    chunk = sprintf("%1048576s", "")
    for (i = 0; i < mib; i++) heap[i] = chunk i
    print "payments: heap ready, serving :" port
    fflush()
    # system() blocks while httpd runs, so awk (and the heap) stays resident for the container lifetime.
    system("exec httpd -f -p " port " -h /srv/payments")
}'
