#!/usr/bin/env bash
# A throwaway PostgreSQL server for optc's tests (optuna's RDBStorage, `--storage postgresql://...`).
#
#   bash .ci/postgres.sh install      install Debian's postgresql package if the server binaries are missing
#                                     (apt-get; through `sudo -n` when not root)
#   bash .ci/postgres.sh start        initdb into a new temp dir and start a server on 127.0.0.1:<free port>
#                                     (and a unix socket in that dir), fsync off, trust auth, superuser
#                                     `postgres`, with an empty database `optc_test`. Prints, on stdout:
#                                       export OPTC_TEST_POSTGRES_DIR=/tmp/optc-pg.XXXXXX
#                                       export OPTC_TEST_POSTGRES_URL=postgresql+psycopg2://postgres@127.0.0.1:PORT/optc_test
#                                     so `eval "$(bash .ci/postgres.sh start)"` sets up the tests' environment.
#   bash .ci/postgres.sh stop [DIR]   stop that server and delete DIR (default: $OPTC_TEST_POSTGRES_DIR)
#   bash .ci/postgres.sh bindir       print the directory of the server binaries (exit 1 if there are none)
#
# initdb and postgres refuse to run as root: as root they run as the `postgres` system user
# (created by Debian's package), who owns the temp dir. Set OPTC_POSTGRES_BINDIR to use other binaries.
# Messages go to stderr; the server's log is DIR/log.
set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }

bindir() {
    local d
    if [[ -n "${OPTC_POSTGRES_BINDIR:-}" ]]; then
        [[ -x "$OPTC_POSTGRES_BINDIR/initdb" ]] || return 1
        echo "$OPTC_POSTGRES_BINDIR"; return 0
    fi
    # Debian keeps the server binaries off PATH, one folder per major version: take the newest.
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]]; then echo "$d"; return 0; fi
    done
    d=$(command -v initdb 2>/dev/null) || return 1
    d=$(dirname "$(readlink -f "$d")")
    [[ -x "$d/pg_ctl" && -x "$d/postgres" ]] || return 1
    echo "$d"
}

# Run a command as the server's owner: ourselves, or the postgres system user when we are root.
as_owner() {
    if [[ $(id -u) -ne 0 ]]; then
        "$@"
    elif command -v runuser >/dev/null; then
        (cd / && runuser -u postgres -- "$@")
    else
        (cd / && su -s /bin/bash -c "exec $(printf '%q ' "$@")" postgres)
    fi
}

cmd_install() {
    if bindir >/dev/null; then return 0; fi
    local -a sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || die "the PostgreSQL server is not installed, and without root or sudo this script cannot install it (apt-get install postgresql)"
        sudo=(sudo -n)
    fi
    log "installing Debian's postgresql package"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql >&2
    bindir >/dev/null || die "postgresql was installed, but no initdb/pg_ctl/postgres were found in /usr/lib/postgresql/*/bin or on PATH"
}

free_port() {
    if command -v python3 >/dev/null; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    else
        echo $((20000 + RANDOM % 40000))
    fi
}

cmd_start() {
    local bin dir port url tries
    bin=$(bindir) || die "no PostgreSQL server binaries (initdb, pg_ctl, postgres) in /usr/lib/postgresql/*/bin or on PATH; run \`bash .ci/postgres.sh install\` or install Debian's postgresql package"
    if [[ $(id -u) -eq 0 ]]; then
        getent passwd postgres >/dev/null || die "running as root, but there is no \`postgres\` system user to run the server as (Debian's postgresql package creates it)"
    fi
    # As root the server runs as postgres, who must reach the dir: fall back to /tmp if $TMPDIR is private.
    dir=$(mktemp -d "${TMPDIR:-/tmp}/optc-pg.XXXXXX")
    if [[ $(id -u) -eq 0 ]]; then
        chown postgres: "$dir"
        if ! as_owner test -w "$dir"; then
            rmdir "$dir"; dir=$(mktemp -d /tmp/optc-pg.XXXXXX); chown postgres: "$dir"
        fi
    fi
    # Leave nothing behind if any step below fails.
    trap 'as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$dir"' ERR

    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --no-locale -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; false; }
    cat >>"$dir/data/postgresql.conf" <<EOF
# optc tests: a throwaway server, durability off
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
    for tries in 1 2 3 4 5; do
        port=$(free_port)
        # Another process may take the port between free_port and the server's bind: then try another.
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -o "-p $port" -w -t 60 start >/dev/null; then
            break
        fi
        [[ $tries -lt 5 ]] || { tail -n 20 "$dir/log" >&2 || true; false; }
        log "the server did not start on port $port; trying another"
    done
    echo "$port" >"$dir/port"
    # Client programs, over TCP (trust auth): any user may connect as postgres.
    "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres optc_test >&2
    url="postgresql+psycopg2://postgres@127.0.0.1:$port/optc_test"
    echo "$url" >"$dir/url"
    trap - ERR
    log "$("$bin/pg_ctl" --version | sed 's/^pg_ctl (PostgreSQL) /PostgreSQL /') is serving $url (data and log in $dir)"
    echo "export OPTC_TEST_POSTGRES_DIR=$dir"
    echo "export OPTC_TEST_POSTGRES_URL=$url"
}

cmd_stop() {
    local dir=${1:-${OPTC_TEST_POSTGRES_DIR:-}} bin
    [[ -n "$dir" ]] || die "usage: $0 stop DIR (or set OPTC_TEST_POSTGRES_DIR, as \`start\` prints it)"
    [[ -d "$dir" ]] || { log "$dir does not exist: nothing to stop"; return 0; }
    [[ -f "$dir/port" || -d "$dir/data" ]] || die "$dir does not look like a server made by \`$0 start\`; not deleting it"
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        bin=$(bindir) || die "no PostgreSQL binaries found to stop the server in $dir"
        as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null || log "pg_ctl stop failed (the server may already be gone)"
    fi
    rm -rf "$dir"
    log "stopped the server in $dir and deleted it"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) shift; cmd_stop "$@" ;;
    bindir) bindir || die "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin or on PATH" ;;
    *) sed -n '2,17s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac
