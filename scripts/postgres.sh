# Sourced by scripts/test and scripts/sandbox: finds the Postgres server binaries (initdb,
# pg_ctl), installing Debian's postgresql package when they are missing, and exports
# PG_BIN_DIR for the Rust code that starts throwaway servers.

find_pg_bin() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$dir/pg_ctl" ] && { echo "$dir"; return 0; }
  done
  command -v pg_ctl >/dev/null 2>&1 && { dirname "$(command -v pg_ctl)"; return 0; }
  return 1
}

ensure_postgres() {
  if ! PG_BIN=$(find_pg_bin); then
    printf '==> %s\n' "Postgres binaries missing: installing the postgresql package" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
    PG_BIN=$(find_pg_bin)
  fi
  export PG_BIN_DIR="$PG_BIN"
}
