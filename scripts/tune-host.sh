#!/usr/bin/env bash
# Kernel settings for a host that holds about 1M WebSocket connections (ringcast, or
# the loadgen that opens them).
#
#   scripts/tune-host.sh              show each setting: current value, wanted value, why
#   scripts/tune-host.sh --apply      also set the ones below what is needed (as root)
#   scripts/tune-host.sh --apply --persist
#                                     and write them to /etc/sysctl.d/99-ringcast.conf
#
# Idempotent: a value already at or above what is needed is left alone (nothing is ever
# lowered, except the TCP buffer defaults, which are set exactly). A read-only /proc/sys
# (a container) is reported, never an error: the script exits 0 whatever it could set.
set -uo pipefail

apply=0
persist=0
for arg in "$@"; do
  case "$arg" in
    --apply) apply=1 ;;
    --persist) persist=1 ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "tune-host.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done
if [ "$apply" = 1 ] && [ "$(id -u)" != 0 ] && [ -z "${TUNE_HOST_PROC_SYS:-}" ]; then
  echo "tune-host.sh: --apply needs root; showing only" >&2
  apply=0
fi

# Memory in 4 KiB pages, to size tcp_mem.
mem_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo 2>/dev/null || echo 0)
pages=$((mem_kib / 4))

# TUNE_HOST_PROC_SYS points the script at a copy of /proc/sys (for testing it).
proc_sys=${TUNE_HOST_PROC_SYS:-/proc/sys}
changed=0
failed=0
persist_lines=()

# setting KEY WANTED MODE EXPLANATION
#   MODE min:   raise to WANTED when below (one number)
#   MODE exact: set to WANTED when different (several numbers compare field by field)
setting() {
  local key=$1 wanted=$2 mode=$3 why=$4
  local path=$proc_sys/${key//.//}
  echo
  echo "# $why"
  if [ ! -e "$path" ]; then
    echo "$key: not present on this kernel (or module not loaded): skipped"
    return
  fi
  local cur
  cur=$(tr -s ' \t' ' ' <"$path" 2>/dev/null | sed 's/^ //; s/ $//')
  local ok=1
  if [ "$mode" = min ]; then
    [ "${cur:-0}" -ge "$wanted" ] 2>/dev/null || ok=0
  else
    [ "$cur" = "$wanted" ] || ok=0
  fi
  persist_lines+=("$key = $([ "$ok" = 1 ] && [ "$mode" = min ] && echo "$cur" || echo "$wanted")")
  if [ "$ok" = 1 ]; then
    echo "$key = $cur  (ok; wanted $([ "$mode" = min ] && echo ">= ")$wanted)"
    return
  fi
  if [ "$apply" = 0 ]; then
    echo "$key = $cur  -> wanted $wanted  (run with --apply as root to set)"
    return
  fi
  if (echo "$wanted" >"$path") 2>/dev/null; then
    echo "$key = $wanted  (set; was $cur)"
    changed=$((changed + 1))
  else
    echo "$key = $cur  -> wanted $wanted: COULD NOT SET (read-only /proc/sys, e.g. in a container; set it on the host)"
    failed=$((failed + 1))
  fi
}

echo "ringcast host tuning for ~1M connections ($( [ "$apply" = 1 ] && echo applying || echo showing only ))"
echo "memory: $((mem_kib / 1024)) MiB"

setting fs.file-max 2097152 min \
  "System-wide open files: 1M sockets plus everything else on the host."
setting fs.nr_open 2097152 min \
  "Per-process ceiling for RLIMIT_NOFILE: one process (ringcast) holds every socket."
setting net.ipv4.ip_local_port_range "10000 65535" exact \
  "Ephemeral ports per (source IP, destination) pair: matters for the loadgen and for outbound connections (Redis); the loadgen also rotates 127.0.0.x source addresses. Starts at 10000 so that listeners below it (ringcast's 4000, the cluster harness's nodes from 4700, Redis's 6379) never find their port taken by an outbound connection: from 1024, a node of the 53-node run could not listen on 4752."
setting net.core.somaxconn 65535 min \
  "Accept queue length cap: reconnect storms after a restart arrive by the hundred thousand."
setting net.ipv4.tcp_max_syn_backlog 65535 min \
  "Half-open (SYN_RECV) connections queued per listener during a storm."
setting net.core.netdev_max_backlog 65536 min \
  "Packets queued per CPU between the NIC and the stack during bursts (broadcast fanout, connect storms)."
setting net.ipv4.tcp_rmem "4096 8192 6291456" exact \
  "TCP receive buffer min/default/max: small default (8 KiB) so 1M mostly idle sockets stay cheap; autotuning still grows busy ones."
setting net.ipv4.tcp_wmem "4096 8192 6291456" exact \
  "TCP send buffer min/default/max: small default for idle sockets; a slow subscriber's backlog is bounded by ringcast's --max-outbound, not by kernel buffers."
setting net.ipv4.tcp_mem "$((pages / 4)) $((pages / 3)) $((pages / 2))" exact \
  "TCP memory for all sockets, in pages (low/pressure/high = 1/4, 1/3, 1/2 of RAM): the default pressure point is too low for 1M sockets with data in flight."
setting net.ipv4.tcp_tw_reuse 1 exact \
  "Reuse TIME_WAIT sockets for new outbound connections on every interface (2 = loopback only): lets load generators reconnect without waiting 60 s."
setting net.netfilter.nf_conntrack_max 2097152 min \
  "Connection tracking table (only when nf_conntrack is loaded): a full table drops new connections silently."

echo
echo "# RLIMIT_NOFILE (per process open files; not a sysctl)"
echo "current shell: soft $(ulimit -Sn), hard $(ulimit -Hn); wanted >= 1048576 for the server process"
cat <<'ADVICE'
  - login sessions: /etc/security/limits.d/99-ringcast.conf with
        *  soft  nofile  1048576
        *  hard  nofile  1048576
  - a systemd service: LimitNOFILE=1048576 in its [Service] section
  - docker: --ulimit nofile=1048576:1048576
  (fs.nr_open above must be at least as high. ringcast-loadgen raises its soft limit
  to the hard one by itself and spreads connections over worker processes.)
ADVICE

if [ "$persist" = 1 ]; then
  if [ "$apply" = 1 ] && [ -d /etc/sysctl.d ] && { printf '# written by ringcast scripts/tune-host.sh\n'; printf '%s\n' "${persist_lines[@]}"; } >/etc/sysctl.d/99-ringcast.conf 2>/dev/null; then
    echo
    echo "written /etc/sysctl.d/99-ringcast.conf (applied at boot)"
  else
    echo
    echo "could not write /etc/sysctl.d/99-ringcast.conf (needs --apply, root and a writable /etc)"
  fi
fi

echo
echo "summary: $changed changed, $failed could not be set$([ "$apply" = 0 ] && echo " (show-only run)")"
exit 0
