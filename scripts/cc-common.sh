# Shared set-up of the quick `cc` measurements (scripts/cc-threads, scripts/syscalls-per-connection);
# sourced, not run. After `cc_setup`, a temporary folder `$wd` holds:
#
# - an nginx backend serving a 100 B file on 127.0.0.1:$backend (already started);
# - nginx stream-proxy configurations `$wd/proxy1.conf` and `$wd/proxy2.conf` (1 and 2 workers)
#   listening on 127.0.0.1:$ngport, and `$wd/proxy1hc.conf`, `$wd/proxy2hc.conf` the same with
#   `proxy_half_close on` (the half-close tagway does);
# - tagway's `$wd/gw.toml` (entry point on 127.0.0.1:$gwport, file provider) and `$wd/dyn.toml`
#   (one router `HostSNI(`*`)` to the backend), the default transport;
#
# and `$bin` is the release binary. Every PID pushed on `pids` is killed, and `$wd` removed, at
# exit.

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/target/release/tagway"

# cc_need TOOL...: exits naming the first missing tool.
cc_need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
    done
}

# cc_build PACKAGE BIN: the release build of one binary of the workspace.
cc_build() {
    cargo build --release --locked -p "$1" --bin "$2" --manifest-path "$root/Cargo.toml"
}

cc_cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$wd"
}

# A free port on 127.0.0.1.
cc_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

cc_setup() {
    wd="$(mktemp -d)"
    pids=()
    trap cc_cleanup EXIT
    backend=$(cc_port); gwport=$(cc_port); ngport=$(cc_port)
    mkdir -p "$wd/www" "$wd/logs"
    head -c 100 /dev/zero | tr '\0' a > "$wd/www/f.txt"
    local mod="" m n
    for m in /usr/lib/nginx/modules/ngx_stream_module.so /usr/share/nginx/modules/ngx_stream_module.so; do
        [ -e "$m" ] && mod="load_module $m;"
    done
    cat > "$wd/backend.conf" <<EOF2
daemon off; worker_processes 1; pid $wd/backend.pid; error_log $wd/logs/backend.err;
events { worker_connections 4096; }
http { access_log off; server { listen 127.0.0.1:$backend; root $wd/www; } }
EOF2
    for n in 1 2; do
        cat > "$wd/proxy$n.conf" <<EOF2
$mod
daemon off; master_process on; worker_processes $n; worker_rlimit_nofile 16384;
pid $wd/proxy$n.pid; error_log $wd/logs/proxy.err warn;
events { worker_connections 8192; }
stream { server { listen 127.0.0.1:$ngport backlog=4096; proxy_pass 127.0.0.1:$backend; } }
EOF2
        sed 's/proxy_pass /proxy_half_close on; proxy_pass /' "$wd/proxy$n.conf" > "$wd/proxy${n}hc.conf"
    done
    printf '[entryPoints.bench]\naddress = "127.0.0.1:%s"\n[providers.file]\nfilename = "%s/dyn.toml"\n[log]\nlevel = "error"\n' \
        "$gwport" "$wd" > "$wd/gw.toml"
    printf '[tcp.routers.all]\nrule = "HostSNI(`*`)"\nservice = "up"\n[[tcp.services.up.loadBalancer.servers]]\naddress = "127.0.0.1:%s"\n' \
        "$backend" > "$wd/dyn.toml"
    nginx -p "$wd" -e "$wd/logs/backend.err" -c "$wd/backend.conf" &
    pids+=($!)
    sleep 0.5
}
