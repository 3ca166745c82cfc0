# Reference retry clients for the retry-403 scenario, in busybox sh + nc + awk (the guest has
# nothing else; busybox wget segfaults there). The gateway is the guest's only way out.
#
# Env: CLIENT (naive | backoff | reads-body | llm-loop), CAP (attempts), CELL (a tag put in
# the path, so the gateway's audit log can attribute every request), BLOCKED (host the policy
# denies), MODEL (the stand-in model API host), BASE_MS / MAX_MS (backoff), PROXY (host port).
# Prints one line: attempts=N reason=ok|policy|cap
set -u
# The sandbox's egress, from its own HTTP_PROXY unless given as "host port".
egress=${HTTP_PROXY#http://}
PROXY=${PROXY:-${egress%:*} ${egress##*:}}
OUT=/tmp/br-retry.$$
n=0
reason=cap
delay=${BASE_MS:-20}
permanent() {
    # reads-body: any sign that the answer is a policy decision (header, or the 403's own text).
    # llm-loop: only the machine-readable ones -- the X-Proxy-Error header or "retryable": false.
    if [ "$CLIENT" = reads-body ]; then
        grep -qiE '^x-proxy-error:|^x-blastradius-decision:|blocked by network policy|retry_loop_detected' "$OUT"
    else
        grep -qiE '^x-proxy-error:|"retryable": *false' "$OUT"
    fi
}
ask_model() {
    # One model call per retry: the tokens a real agent spends deciding what to do next.
    body='{"model":"stand-in","max_tokens":64,"messages":[{"role":"user","content":"the request failed, retry?"}]}'
    printf 'POST http://%s/v1/messages/%s HTTP/1.1\r\nHost: %s\r\nx-api-key: proxy-managed\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
        "$MODEL" "$CELL" "$MODEL" "${#body}" "$body" | nc $PROXY > /dev/null 2>&1
}
while [ "$n" -lt "$CAP" ]; do
    n=$((n + 1))
    printf 'GET http://%s/retry403/%s HTTP/1.1\r\nHost: %s\r\nUser-Agent: br-%s\r\nConnection: close\r\n\r\n' \
        "$BLOCKED" "$CELL" "$BLOCKED" "$CLIENT" | nc $PROXY > "$OUT" 2>/dev/null
    status=$(awk 'NR==1 { print $2; exit }' "$OUT")
    case "$status" in 2??) reason=ok; break ;; esac
    case "$CLIENT" in
        reads-body)
            if permanent; then reason=policy; break; fi ;;
        llm-loop)
            ask_model
            if permanent; then reason=policy; break; fi ;;
        backoff)
            # Exponential backoff with full jitter in [delay/2, delay].
            sleep "$(awk -v d="$delay" -v s="$$$n" 'BEGIN { srand(s); printf "%.3f", d * (0.5 + rand() / 2) / 1000 }')"
            delay=$((delay * 2))
            [ "$delay" -gt "${MAX_MS:-500}" ] && delay=${MAX_MS:-500} ;;
    esac
done
rm -f "$OUT"
echo "attempts=$n reason=$reason"
