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

# Called with what is left after a launcher's option loop, which stops (`*) break`) at the
# first word it does not know: refuse an unknown option, require a stage. A leading `--`
# ends the options; the caller drops it (a function cannot shift its caller's arguments):
#     kdcl_check_stage "$@"; [[ "$1" != -- ]] || shift
kdcl_check_stage() {
    if [[ "${1:-}" == -- ]]; then
        shift
    elif [[ "${1:-}" == -* ]]; then
        kdcl_die "unknown option $1 (options go before the stage name; try --help)"
    fi
    kdcl_need_stage "$@"
}

# A hostfile named by --hostfile must exist.
kdcl_check_hostfile() {
    [[ -f "$1" ]] || kdcl_die "hostfile $1 does not exist; write one line '<host> slots=<n>' per node"
}

# The DeepSpeed launchers cannot run without one.
kdcl_require_hostfile() {
    [[ -n "$1" ]] || kdcl_die "--hostfile is required (lines '<host> slots=<n>'; see launcher/hostfile.example)"
    kdcl_check_hostfile "$1"
}

kdcl_is_int() {
    [[ "$1" =~ ^[0-9]+$ ]]
}
