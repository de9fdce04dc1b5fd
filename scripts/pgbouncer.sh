# shellcheck shell=bash
# The PgBouncers tests/pgbouncer.rs runs mailpoll behind, sourced by scripts/test.
#
# Transaction pooling needs PgBouncer 1.21 or later (prepared statements kept per client);
# Debian 12 ships 1.18. So Debian 13's PgBouncer is built from its source package (the
# upstream tarball Debian distributes, checksum pinned) into target/, once, and named to the
# tests by MAILPOLL_PGBOUNCER. Debian 12's own package is installed too: a test shows its 1.18
# failing in transaction mode, the reason README asks for 1.21.

PGBOUNCER_VERSION=1.24.1
PGBOUNCER_SHA256=da72a3aba13072876d055a3e58dd4aba4a5de4ed6148e73033185245598fd3e0
PGBOUNCER_PREFIX="target/pgbouncer-$PGBOUNCER_VERSION"

ensure_debian_pgbouncer() {
  if [ ! -x /usr/sbin/pgbouncer ]; then
    log "pgbouncer missing: installing the pgbouncer package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends pgbouncer >&2
  fi
}

build_pgbouncer() {
  log "building PgBouncer $PGBOUNCER_VERSION (Debian 13's source) into $PGBOUNCER_PREFIX"
  if ! dpkg -s libevent-dev libssl-dev pkg-config make >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends libevent-dev libssl-dev pkg-config make >&2
  fi
  local work tarball prefix
  work=$(mktemp -d /tmp/mailpoll-pgbouncer-build.XXXXXX)
  tarball="$work/pgbouncer_$PGBOUNCER_VERSION.orig.tar.gz"
  prefix="$(pwd)/$PGBOUNCER_PREFIX"
  curl -fsSL --retry 3 -o "$tarball" \
    "http://deb.debian.org/debian/pool/main/p/pgbouncer/pgbouncer_$PGBOUNCER_VERSION.orig.tar.gz"
  echo "$PGBOUNCER_SHA256  $tarball" | sha256sum -c --quiet -
  tar -xzf "$tarball" -C "$work"
  (
    cd "$work/pgbouncer-$PGBOUNCER_VERSION"
    ./configure --prefix="$prefix" --without-cares --without-pam --without-systemd >/dev/null
    make -j"$(nproc)" >/dev/null
    make install >/dev/null
  )
  rm -rf "$work"
}

ensure_pgbouncers() {
  ensure_debian_pgbouncer
  if [ -z "${MAILPOLL_PGBOUNCER:-}" ]; then
    [ -x "$PGBOUNCER_PREFIX/bin/pgbouncer" ] || build_pgbouncer
    MAILPOLL_PGBOUNCER="$(pwd)/$PGBOUNCER_PREFIX/bin/pgbouncer"
    export MAILPOLL_PGBOUNCER
  fi
  log "PgBouncer for transaction pooling: $("$MAILPOLL_PGBOUNCER" --version | head -1)"
}
