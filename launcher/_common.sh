# shellcheck shell=bash
# Shared helpers for the launcher scripts (sourced, not run).
#
# Every launcher runs `python -m kdcl_dist <stage> ...` (or $KDCL_MODULE) on every rank with
# the stage's own arguments passed through untouched. Paths in those arguments are taken
# relative to the directory you launch from, on every node (the deepspeed launcher `cd`s
# there on remote nodes), so launch from a directory that exists everywhere.

kdcl_die() {
    echo "$(basename "$0"): error: $*" >&2
    exit 2
}

# The Python that runs every rank: $PYTHON if set, else the first python3/python on PATH
# that can import kdcl_dist (an activated virtualenv wins because it is first on PATH).
kdcl_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        command -v "$PYTHON" >/dev/null 2>&1 || kdcl_die "PYTHON=$PYTHON is not executable; point it at the interpreter that has kdcl_dist installed"
        command -v "$PYTHON"
        return
    fi
    local cand
    for cand in python3 python; do
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import kdcl_dist" >/dev/null 2>&1; then
            command -v "$cand"
            return
        fi
    done
    kdcl_die "no python on PATH can import kdcl_dist; activate the virtualenv (. .venv/bin/activate) or set PYTHON=/path/to/python"
}

# A TCP port that is free right now on this machine (for single-machine launches only;
# multi-node jobs must agree on a port, so they take --master-port or the default).
kdcl_free_port() {
    "$1" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

kdcl_need_stage() {
    [[ $# -gt 0 ]] || kdcl_die "no stage given; usage: $(basename "$0") [options] [--] <stage> [stage args...] (try --help)"
}

kdcl_is_int() {
    [[ "$1" =~ ^[0-9]+$ ]]
}
