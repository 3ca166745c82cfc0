#!/bin/sh
# podrt: a very small kubelet for one pod, in busybox sh. It honours what matters for payments-service:
#   resources.limits.memory  -> cgroup v2 memory.max (+ memory.oom.group), so the kernel OOM-kills for real
#   livenessProbe.httpGet    -> periodic HTTP GET; failureThreshold misses kill the container, which restarts
#   readinessProbe.httpGet   -> the container's Ready flag (no probe: Ready while running)
#   restarts                 -> restartCount, with CrashLoopBackOff-style doubling back-off
# The host (the "API server") compiles manifests into $ROOT/spec.<gen>/ and flips $ROOT/gen to roll out.
# State goes to $ROOT/status (rewritten every tick) and $ROOT/events (appended), in Kubernetes' vocabulary.
ROOT=/run/podrt
CGROOT=/sys/fs/cgroup/kubepods
EVENTS=$ROOT/events
TICK_S=1
BACKOFF_BASE_S=10
BACKOFF_MAX_S=300
[ -f "$ROOT/settings" ] && . "$ROOT/settings"
echo $$ >"$ROOT/pid"

now_ms() {
    read -r up _ </proc/uptime
    frac=${up#*.}
    NOW=$(( ${up%.*} * 1000 + ${frac#0} * 10 ))
}

# event TYPE REASON OBJECT MESSAGE
event() {
    now_ms
    echo "$NOW|$1|$2|$3|$4" >>"$EVENTS"
}

oom_kills() {
    awk '$1 == "oom_kill" { print $2; found = 1 } END { if (!found) print 0 }' "$1/memory.events" 2>/dev/null || echo 0
}

# probe_http PORT PATH TIMEOUT: sets PROBE_MSG; succeeds on an HTTP status 200-399, like the kubelet.
probe_http() {
    reply=$(printf 'GET %s HTTP/1.0\r\nHost: localhost\r\nUser-Agent: kube-probe/1.30\r\n\r\n' "$2" |
        timeout "$3" nc 127.0.0.1 "$1" 2>&1 | head -n 1 | tr -d '\r')
    case "$reply" in
        "HTTP/1."?" "[23][0-9][0-9]*) PROBE_MSG=$reply; return 0 ;;
        "") PROBE_MSG="Get \"http://127.0.0.1:$1$2\": dial tcp 127.0.0.1:$1: connect: connection refused" ;;
        HTTP/*) PROBE_MSG="HTTP probe failed with statuscode: ${reply#* }" ;;
        *) PROBE_MSG="Get \"http://127.0.0.1:$1$2\": $reply" ;;
    esac
    return 1
}

load_pod() {
    read -r GEN <"$ROOT/gen"
    SPEC=$ROOT/spec.$GEN
    . "$SPEC/pod"  # POD N
    mkdir -p "$CGROOT/$POD" "$ROOT/state/$POD" "$ROOT/logs"
    echo +memory >"$CGROOT/$POD/cgroup.subtree_control"
    now_ms
    POD_STARTED=$NOW
    event Normal Scheduled "pod/$POD" "Successfully assigned default/$POD to $(hostname)"
    i=0
    while [ "$i" -lt "$N" ]; do
        while IFS='=' read -r key value; do
            [ -n "$key" ] && eval "C${i}_$key=\$value"
        done <"$SPEC/c$i.conf"
        eval "name=\$C${i}_NAME mem=\$C${i}_MEM_MAX"
        mkdir -p "$CGROOT/$POD/$name" "$ROOT/state/$POD/c$i"
        echo "$mem" >"$CGROOT/$POD/$name/memory.max"
        # Kill the whole container on OOM, as the kubelet configures cgroup v2 (memory.oom.group).
        echo 1 >"$CGROOT/$POD/$name/memory.oom.group"
        eval "C${i}_STATE=waiting C${i}_REASON=ContainerCreating C${i}_READY=0 C${i}_RESTARTS=0 C${i}_NEXT=0"
        eval "C${i}_STARTED=0 C${i}_LAST_REASON= C${i}_LAST_EXIT= C${i}_LAST_FINISHED= C${i}_LFAIL=0 C${i}_RFAIL=0"
        eval "C${i}_LNEXT=0 C${i}_RNEXT=0 C${i}_OOM0=0 C${i}_PID="
        i=$((i + 1))
    done
}

start_container() {
    i=$1
    eval "name=\$C${i}_NAME image=\$C${i}_IMAGE"
    cg=$CGROOT/$POD/$name
    sd=$ROOT/state/$POD/c$i
    rm -f "$sd/exit" "$sd/liveness-kill"
    eval "C${i}_OOM0=$(oom_kills "$cg")"
    setsid sh "$ROOT/shim.sh" "$cg" "$sd" "$image" "$SPEC/c$i.env" "$ROOT/logs/${POD}_$name.log" </dev/null \
        >/dev/null 2>&1 &
    now_ms
    eval "C${i}_STATE=running C${i}_REASON= C${i}_STARTED=$NOW C${i}_READY=0 C${i}_LFAIL=0 C${i}_RFAIL=0"
    eval "C${i}_LNEXT=0 C${i}_RNEXT=0"
    event Normal Started "pod/$POD" "Started container $name"
}

container_exited() {
    i=$1
    eval "name=\$C${i}_NAME oom0=\$C${i}_OOM0 restarts=\$C${i}_RESTARTS"
    cg=$CGROOT/$POD/$name
    sd=$ROOT/state/$POD/c$i
    read -r rc finished <"$sd/exit"
    if [ "$(oom_kills "$cg")" -gt "$oom0" ]; then
        reason=OOMKilled rc=137
        event Warning OOMKilled "pod/$POD" "Container $name was OOMKilled (memory.max $(cat "$cg/memory.max"))"
    elif [ "$rc" -eq 0 ]; then
        reason=Completed
    else
        reason=Error
    fi
    [ -e "$sd/liveness-kill" ] && rc=137
    delay=$BACKOFF_BASE_S
    n=0
    while [ "$n" -lt "$restarts" ] && [ "$delay" -lt "$BACKOFF_MAX_S" ]; do delay=$((delay * 2)); n=$((n + 1)); done
    [ "$delay" -gt "$BACKOFF_MAX_S" ] && delay=$BACKOFF_MAX_S
    now_ms
    eval "C${i}_STATE=waiting C${i}_REASON=CrashLoopBackOff C${i}_READY=0 C${i}_NEXT=$((NOW + delay * 1000))"
    eval "C${i}_LAST_REASON=$reason C${i}_LAST_EXIT=$rc C${i}_LAST_FINISHED=$finished"
    event Warning BackOff "pod/$POD" "Back-off ${delay}s restarting failed container $name in pod $POD"
}

check_probes() {
    i=$1
    eval "name=\$C${i}_NAME started=\$C${i}_STARTED"
    eval "lport=\$C${i}_LIVE_PORT lpath=\$C${i}_LIVE_PATH lper=\$C${i}_LIVE_PERIOD lto=\$C${i}_LIVE_TIMEOUT"
    eval "lthr=\$C${i}_LIVE_FAILURES ldelay=\$C${i}_LIVE_DELAY lnext=\$C${i}_LNEXT lfail=\$C${i}_LFAIL"
    now_ms
    if [ -n "$lport" ] && [ "$NOW" -ge $((started + ldelay * 1000)) ] && [ "$NOW" -ge "$lnext" ]; then
        eval "C${i}_LNEXT=$((NOW + lper * 1000))"
        if probe_http "$lport" "$lpath" "$lto"; then
            eval "C${i}_LFAIL=0"
        else
            lfail=$((lfail + 1))
            eval "C${i}_LFAIL=$lfail"
            event Warning Unhealthy "pod/$POD" "Liveness probe failed: $PROBE_MSG"
            if [ "$lfail" -ge "$lthr" ]; then
                event Normal Killing "pod/$POD" "Container $name failed liveness probe, will be restarted"
                touch "$ROOT/state/$POD/c$i/liveness-kill"
                echo 1 >"$CGROOT/$POD/$name/cgroup.kill"
            fi
        fi
    fi
    eval "rport=\$C${i}_READY_PORT rpath=\$C${i}_READY_PATH rper=\$C${i}_READY_PERIOD rto=\$C${i}_READY_TIMEOUT"
    eval "rthr=\$C${i}_READY_FAILURES rdelay=\$C${i}_READY_DELAY rnext=\$C${i}_RNEXT rfail=\$C${i}_RFAIL"
    if [ -z "$rport" ]; then
        eval "C${i}_READY=1"
    elif [ "$NOW" -ge $((started + rdelay * 1000)) ] && [ "$NOW" -ge "$rnext" ]; then
        eval "C${i}_RNEXT=$((NOW + rper * 1000))"
        if probe_http "$rport" "$rpath" "$rto"; then
            eval "C${i}_READY=1 C${i}_RFAIL=0"
        else
            rfail=$((rfail + 1))
            eval "C${i}_RFAIL=$rfail"
            [ "$rfail" -ge "$rthr" ] && eval "C${i}_READY=0"
            event Warning Unhealthy "pod/$POD" "Readiness probe failed: $PROBE_MSG"
        fi
    fi
}

stop_pod() {
    i=0
    while [ "$i" -lt "$N" ]; do
        eval "name=\$C${i}_NAME"
        echo 1 >"$CGROOT/$POD/$name/cgroup.kill" 2>/dev/null
        i=$((i + 1))
    done
    event Normal Killing "pod/$POD" "Stopping pod $POD (rollout of a new ReplicaSet)"
    # Wait until the killed tasks are gone, then drop the cgroups (rmdir fails while a task remains).
    # cgroupfs files always report size 0, so emptiness is read, not stat'ed.
    for _ in $(seq 50); do
        busy=0
        for procs in "$CGROOT/$POD"/*/cgroup.procs; do [ -n "$(cat "$procs" 2>/dev/null)" ] && busy=1; done
        [ "$busy" -eq 0 ] && break
        sleep 0.2
    done
    for dir in "$CGROOT/$POD"/*/; do rmdir "$dir" 2>/dev/null; done
    rmdir "$CGROOT/$POD" 2>/dev/null
}

write_status() {
    now_ms
    ready=0 restarts=0 phase=Pending status=Running
    out=$ROOT/status.tmp
    : >"$out"
    i=0
    while [ "$i" -lt "$N" ]; do
        eval "name=\$C${i}_NAME st=\$C${i}_STATE reason=\$C${i}_REASON r=\$C${i}_READY rs=\$C${i}_RESTARTS"
        eval "started=\$C${i}_STARTED lr=\$C${i}_LAST_REASON le=\$C${i}_LAST_EXIT lf=\$C${i}_LAST_FINISHED"
        eval "lfail=\$C${i}_LFAIL mem=\$C${i}_MEM_MAX"
        cur=$(cat "$CGROOT/$POD/$name/memory.current" 2>/dev/null || echo 0)
        peak=$(cat "$CGROOT/$POD/$name/memory.peak" 2>/dev/null || echo 0)
        ready=$((ready + r))
        restarts=$((restarts + rs))
        [ "$st" = running ] && phase=Running
        [ -n "$reason" ] && [ "$status" = Running ] && status=$reason
        echo "container name=$name state=$st reason=$reason ready=$r restarts=$rs started_ms=$started" \
            "last_reason=$lr last_exit=$le last_finished_ms=$lf liveness_failures=$lfail" \
            "memory_max=$mem memory_current=$cur memory_peak=$peak" >>"$out"
        i=$((i + 1))
    done
    echo "pod name=$POD gen=$GEN phase=$phase status=$status ready=$ready/$N restarts=$restarts" \
        "started_ms=$POD_STARTED now_ms=$NOW" >>"$out"
    mv "$out" "$ROOT/status"
}

echo +memory >/sys/fs/cgroup/cgroup.subtree_control
mkdir -p "$CGROOT"
echo +memory >"$CGROOT/cgroup.subtree_control"
load_pod
while :; do
    read -r want <"$ROOT/gen"
    if [ "$want" != "$GEN" ]; then
        stop_pod
        load_pod
    fi
    i=0
    while [ "$i" -lt "$N" ]; do
        eval "st=\$C${i}_STATE next=\$C${i}_NEXT reason=\$C${i}_REASON"
        now_ms
        if [ "$st" = running ]; then
            if [ -e "$ROOT/state/$POD/c$i/exit" ]; then
                container_exited "$i"
            else
                check_probes "$i"
            fi
        elif [ "$NOW" -ge "$next" ]; then
            [ "$reason" = CrashLoopBackOff ] && eval "C${i}_RESTARTS=\$((C${i}_RESTARTS + 1))"
            start_container "$i"
        fi
        i=$((i + 1))
    done
    write_status
    sleep "$TICK_S"
done
