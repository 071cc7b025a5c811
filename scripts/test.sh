#!/usr/bin/env bash
# The test command of the README and of CI: ruff and the whole suite in two clean environments,
#   today:   Python 3.11, torch 2.13.0 (CPU) and the oldest release of every other dependency that setup.cfg
#            allows (its lower bounds, installed exactly), the package installed editable;
#   newest:  Python 3.13 with the newest torch, numpy, SciPy and setuptools that pip serves, the package
#            installed as a wheel (`pip install .`, as tox does);
# each suite run from the source tree with the environment's python, not activated (no PATH lookups),
# against NVIDIA's code: $STYLEGAN2_ADA_ROOT and $STYLEGAN3_ROOT, else ../shared/official/{stylegan2-ada-pytorch,
# stylegan3} when they exist (tests work on copies; without a checkout those tests skip and say how to run them).
#   bash scripts/test.sh [today|newest ...]            (default: both)
# Interpreters: $PYTHON_TODAY and $PYTHON_NEWEST, else pyenv's newest 3.11 and 3.13, else python3.11 and python3.13.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
shared=$(cd .. && pwd)/shared/official
if [ -z "${STYLEGAN2_ADA_ROOT:-}" ] && [ -d "$shared/stylegan2-ada-pytorch" ]; then export STYLEGAN2_ADA_ROOT="$shared/stylegan2-ada-pytorch"; fi
if [ -z "${STYLEGAN3_ROOT:-}" ] && [ -d "$shared/stylegan3" ]; then export STYLEGAN3_ROOT="$shared/stylegan3"; fi
export PYTHONDONTWRITEBYTECODE=1    # the tests import NVIDIA's checkouts in place: leave no __pycache__ in them
echo "StyleGAN2-ADA: ${STYLEGAN2_ADA_ROOT:-none (those tests skip)}; StyleGAN3: ${STYLEGAN3_ROOT:-none (those tests skip)}"

interpreter() {  # interpreter VERSION [override]: an executable Python of that minor version
    if [ -n "${2:-}" ]; then echo "$2"; return; fi
    if command -v pyenv >/dev/null; then  # pyenv's shims exist for versions that are not selected: ask pyenv itself
        local v; v=$(pyenv versions --bare | grep -E "^$1\.[0-9]+$" | sort -V | tail -n 1)
        if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python"; return; fi
    fi
    if command -v "python$1" >/dev/null; then command -v "python$1"; return; fi
    echo "no Python $1 found: install it or set PYTHON_TODAY / PYTHON_NEWEST" >&2; return 1
}

lower_bounds() {  # setup.cfg's install_requires lower bounds as exact pins: the "today" environment installs them
    "$1" - <<'PY'
import configparser
cfg = configparser.ConfigParser()
cfg.read('setup.cfg')
for line in cfg['options']['install_requires'].strip().splitlines():
    requirement = line.split(';')[0].strip()
    if '>=' in requirement:
        name, low = requirement.split('>=')
        print(f'{name.strip()}=={low.split(",")[0].strip()}')
PY
}

run_env() {  # run_env NAME PYTHON PIP_ARGS...
    local name=$1 python=$2; shift 2
    local venv="$repo/.venv-$name"
    echo "=== $name: $("$python" --version)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "$@" > "$venv/pip.log" 2>&1 || { tail -n 40 "$venv/pip.log"; return 1; }
    "$venv/bin/python" -c 'import sys, torch, numpy, scipy; print("python", sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__, "scipy", scipy.__version__)'
    "$venv/bin/python" -m ruff check .
    (cd "$repo" && env -u VIRTUAL_ENV PATH="/usr/bin:/bin" "$venv/bin/python" -m pytest -q -p no:cacheprovider)
}

envs=("$@")
[ ${#envs[@]} -gt 0 ] || envs=(today newest)
for env in "${envs[@]}"; do
    case $env in
        today)
            python=$(interpreter 3.11 "${PYTHON_TODAY:-}")
            constraints=$(mktemp)
            lower_bounds "$python" > "$constraints"
            run_env today "$python" torch==2.13.0 -c "$constraints" -e ".[test]" ;;
        newest)
            python=$(interpreter 3.13 "${PYTHON_NEWEST:-}")
            run_env newest "$python" --upgrade torch numpy scipy setuptools ".[test]" ;;
        *) echo "unknown environment $env: use today or newest" >&2; exit 2 ;;
    esac
done
