#!/bin/sh
# One container's lifetime, like a containerd shim: start the image's program inside the container's
# cgroup, wait for it, make sure nothing of it survives, then leave "<exit code> <uptime ms>" in $2/exit
# for podrt to turn into a terminated state. Usage: shim.sh CGROUP STATEDIR IMAGE ENVFILE LOGFILE
cg=$1 sd=$2 image=$3 envfile=$4 log=$5
# The child joins the cgroup before it execs the workload, so every page it touches is charged there.
sh -c 'echo $$ >"$1/cgroup.procs" && . "$2" && exec sh "/opt/podrt/images/$3.sh"' container \
    "$cg" "$envfile" "$image" >>"$log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$sd/pid"
wait "$pid"
rc=$?
# The main process is gone; its children (httpd under awk) must not outlive the container.
echo 1 >"$cg/cgroup.kill" 2>/dev/null
read -r up _ </proc/uptime
frac=${up#*.}
echo "$rc $(( ${up%.*} * 1000 + ${frac#0} * 10 ))" >"$sd/exit.tmp" && mv "$sd/exit.tmp" "$sd/exit"
