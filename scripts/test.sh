#!/usr/bin/env bash
# Runs Tandem's whole test suite on a fresh machine: installs and starts what
# the tests need (a throwaway PostgreSQL server from Debian's packages, on a
# loopback ephemeral port; a Python virtual environment with grpcio for the
# Python client, and kubernetes-validate for the manifests; promtool from
# Debian's prometheus package for the metrics and the example alert rules;
# kubectl from Debian's kubernetes-client package, unless one is installed,
# to render the manifests), builds once, and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

pg_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

start_postgres() {
    local bin
    bin=$(pg_bin)
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        echo "installing PostgreSQL from Debian's packages..."
        export DEBIAN_FRONTEND=noninteractive
        as_root apt-get install -y -q postgresql >/dev/null 2>&1 ||
            { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q postgresql >/dev/null; }
        bin=$(pg_bin)
    fi
    local port user dir
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    dir=$(mktemp -d /tmp/tandem-pg.XXXXXX)
    user=$(id -un)
    # PostgreSQL refuses to run as root: use the account its package made.
    if [ "$(id -u)" = 0 ]; then
        user=postgres
        chown postgres "$dir"
    fi
    local run=(env)
    [ "$user" = "$(id -un)" ] || run=(runuser -u "$user" --)
    "${run[@]}" "$bin/initdb" -D "$dir/data" -A trust -U tandem >/dev/null
    "${run[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300" start >/dev/null
    PG_STOP=("${run[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop)
    PG_DIR=$dir
    trap 'stop_postgres' EXIT
    export TANDEM_TEST_POSTGRES="postgres://tandem@127.0.0.1:$port/postgres"
    export TANDEM_REQUIRE_POSTGRES=1
    echo "PostgreSQL for the tests on 127.0.0.1:$port"
}

stop_postgres() {
    "${PG_STOP[@]}" >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
}

python_env() {
    local venv=target/python-venv
    if [ ! -x "$venv/bin/python" ] ||
        ! "$venv/bin/python" -c 'import grpc, grpc_tools, kubernetes_validate, yaml' 2>/dev/null; then
        echo "creating the Python environment for the Python client and manifest tests..."
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q grpcio grpcio-tools kubernetes-validate==1.37.0 pyyaml
    fi
    export TANDEM_TEST_PYTHON="$PWD/$venv/bin/python"
    export TANDEM_REQUIRE_PYTHON=1
    # (kubernetes-validate carries the schemas: it validates offline.)
    export TANDEM_TEST_KUBE_PYTHON="$PWD/$venv/bin/python"
}

# kubectl renders the kustomize overlays in deploy/ (Debian's package when
# none is installed; the manifests keep to syntax its kustomize reads).
kubectl_env() {
    if ! command -v kubectl >/dev/null 2>&1; then
        echo "installing kubectl from Debian's kubernetes-client package..."
        export DEBIAN_FRONTEND=noninteractive
        as_root apt-get install -y -q --no-install-recommends kubernetes-client >/dev/null 2>&1 ||
            { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q --no-install-recommends kubernetes-client >/dev/null; }
    fi
    TANDEM_TEST_KUBECTL=$(command -v kubectl)
    export TANDEM_TEST_KUBECTL
    export TANDEM_REQUIRE_KUBE=1
}

# promtool, from Debian's prometheus package: checks the metrics the
# processes serve and the example alert rules.
promtool_env() {
    if ! command -v promtool >/dev/null 2>&1; then
        echo "installing promtool from Debian's prometheus package..."
        export DEBIAN_FRONTEND=noninteractive
        as_root apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 ||
            { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q --no-install-recommends prometheus >/dev/null; }
    fi
    TANDEM_TEST_PROMTOOL=$(command -v promtool)
    export TANDEM_TEST_PROMTOOL
    export TANDEM_REQUIRE_PROMTOOL=1
    promtool check rules deploy/alerts.yaml
}

start_postgres
python_env
promtool_env
kubectl_env

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --features tandem-cli/bench
else
    cargo test --workspace --features tandem-cli/bench
fi

# A short fault campaign (a few minutes): seeded workload and faults against
# real processes, each cycle's history checked. A failing cycle prints its
# seed; `target/debug/tandem-e2e campaign --seed S --cycles 1` replays it.
# TANDEM_CAMPAIGN_CYCLES=0 skips it.
# Then a few cycles with three coordinator replicas on a PostgreSQL server
# of the campaign's own (TANDEM_REPLICATED_CYCLES, default 2).
cycles="${TANDEM_CAMPAIGN_CYCLES:-6}"
replicated="${TANDEM_REPLICATED_CYCLES:-2}"
if [ "$cycles" -gt 0 ] || [ "$replicated" -gt 0 ]; then
    cargo build -p tandem-e2e --bin tandem-e2e
fi
if [ "$cycles" -gt 0 ]; then
    target/debug/tandem-e2e campaign --cycles "$cycles" --dir target/campaign
fi
if [ "$replicated" -gt 0 ]; then
    target/debug/tandem-e2e campaign --replicated --cycles "$replicated" --dir target/campaign
fi
