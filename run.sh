#!/usr/bin/env bash
# ssl_us entry point. The first run creates .venv and installs the package with its test extras.
#   ./run.sh                 demo: synthetic data -> shards -> SimCLR pretraining -> linear probe
#   ./run.sh test [ARGS]     the test suite (pytest ARGS; installs the beam extra too)
#   ./run.sh prep ARGS       python -m data_prep ARGS (with --runner beam: installs the beam extra)
#   ./run.sh pretrain ARGS   python -m ssl_us.main ARGS
#   ./run.sh finetune ARGS   python -m ssl_us.finetune ARGS
#   ./run.sh sweep ARGS      python -m ssl_us.sweep ARGS
#   ./run.sh bench ARGS      python -m benchmarks.run ARGS (installs the bench extras: torch CPU)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SSL_US_VENV:-.venv}
PY="$VENV/bin/python"

ensure_env() {
  local extras=$1 stamp="$VENV/.installed-$1"
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    echo "[run.sh] installing ssl_us[$extras] into $VENV (first run takes a few minutes)" >&2
    "$PY" -m pip install -q -e ".[$extras]"
    touch "$stamp"
  fi
}

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo)     ensure_env test; exec "$PY" -m ssl_us.demo "$@" ;;
  test)     ensure_env "test,beam"; exec "$PY" -m pytest -q -n 2 --dist loadfile tests "$@" ;;
  prep)     if [[ " $* " == *" --runner beam "* || " $* " == *" --runner=beam "* ]]; then
              ensure_env "test,beam"; else ensure_env test; fi
            exec "$PY" -m data_prep "$@" ;;
  pretrain) ensure_env test; exec "$PY" -m ssl_us.main "$@" ;;
  finetune) ensure_env test; exec "$PY" -m ssl_us.finetune "$@" ;;
  sweep)    ensure_env test; exec "$PY" -m ssl_us.sweep "$@" ;;
  bench)    ensure_env "test,bench"; exec "$PY" -m benchmarks.run "$@" ;;
  *) echo "usage: ./run.sh [demo|test|prep|pretrain|finetune|sweep|bench] [ARGS...]" >&2; exit 2 ;;
esac
