#!/usr/bin/env bash
# Runs a command against a MySQL server of its own: a fresh data directory under
# .services/mysql-server, the server unpacked by `make mysql` (OUTBOX_TEST_MYSQL overrides
# where), listening on 127.0.0.1:$MYSQL_PORT (default 3308) with the binary log off, as the
# machine's MariaDB runs. The command gets OUTBOX_DATABASE_URL pointing at it; the server
# is stopped when the command ends, whatever its outcome. OUTBOX_TEST_SERVER=mysql makes the
# tests that start a private server of their own start MySQL as well.
#
#   tests/support/with_mysql.sh cargo test --features cli
set -euo pipefail
cd "$(dirname "$0")/../.."

port="${MYSQL_PORT:-3308}"
root="${OUTBOX_TEST_MYSQL:-$PWD/.services/mysql/root}"
dir="$PWD/.services/mysql-server"
loader="$root/usr/lib64/ld-linux-x86-64.so.2"
[ -x "$loader" ] || { echo "MySQL is not unpacked at $root (make mysql)" >&2; exit 1; }
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "127.0.0.1:$port is taken: set MYSQL_PORT to a free port" >&2
  exit 1
fi

mysqld=("$loader" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu"
  "$root/usr/sbin/mysqld" --no-defaults --basedir="$root/usr"
  --lc-messages-dir="$root/usr/share/mysql")

rm -rf "$dir" && mkdir -p "$dir"
"${mysqld[@]}" --initialize-insecure --user=root --datadir="$dir/data" >"$dir/init.log" 2>&1 ||
  { cat "$dir/init.log" >&2; exit 1; }
"${mysqld[@]}" --user=root --datadir="$dir/data" --port="$port" --bind-address=127.0.0.1 \
  --socket="$dir/sock" --pid-file="$dir/pid" --log-error="$dir/error.log" \
  --mysqlx=OFF --secure-file-priv= --skip-log-bin --max-connections=500 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT

for _ in $(seq 1 60); do
  mysql --host=127.0.0.1 --port="$port" --user=root -e "CREATE DATABASE IF NOT EXISTS test" \
    2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { cat "$dir/error.log" >&2; exit 1; }
  sleep 1
done
version=$(mysql --host=127.0.0.1 --port="$port" --user=root -N -e "SELECT VERSION()")
echo "MySQL $version on 127.0.0.1:$port ($dir)"

# The tests that start a server of their own (killed, restarted) start MySQL too.
OUTBOX_DATABASE_URL="mysql://root@127.0.0.1:$port/test" OUTBOX_TEST_SERVER=mysql "$@"
