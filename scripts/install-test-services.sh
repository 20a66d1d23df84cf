#!/usr/bin/env bash
# Debian packages of the real servers some tests run against: coturn (the simulated Twilio's
# TURN relay), Redis and PostgreSQL (the multi-instance store and event bus). The tests start
# their own instances on 127.0.0.1. Installs only what is missing, and only as root; otherwise
# it says what to install (the tests that need a missing server fail naming its package).
set -euo pipefail
need=()
command -v turnserver >/dev/null 2>&1 || need+=(coturn)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing test servers: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "warning: missing test servers: ${need[*]} (sudo apt-get install ${need[*]})" >&2
fi
