#!/usr/bin/env bash
# Installs Erlang/OTP and Elixir from the distribution's packages (Debian/Ubuntu).
set -euo pipefail
if command -v mix >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "error: Elixir is missing and this user cannot install packages; install 'elixir erlang-dev' (OTP >= 25, Elixir >= 1.14)" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: Elixir is missing and apt-get is not available; install Elixir >= 1.14 on OTP >= 25 yourself" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq elixir erlang-dev >/dev/null
mix --version | tail -n 1
