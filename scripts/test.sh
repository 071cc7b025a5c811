#!/usr/bin/env bash
# The test command of the README and of CI: ruff and the whole suite in clean environments,
#   oldest:  Python 3.11 and the oldest release of every dependency that setup.cfg allows (its lower bounds,
#            installed exactly: torch 2.1.0 from PyPI, a CUDA build that runs on the CPU), the package
#            installed editable;
#   newest:  Python 3.13 with the newest torch, numpy, SciPy and setuptools that pip serves, the package
#            installed as the README's offline install does it: a wheel, with no package index;
#   today:   (not in the default run) Python 3.11, torch 2.13.0 (CPU) and the lower bounds of the rest;
# in each, first: installing rtm-mapping into the environment so built would change no installed package
# (pip install --dry-run); then the suite, run from the source tree with the environment's python, not
# activated (no PATH lookups), against NVIDIA's code: $STYLEGAN2_ADA_ROOT and $STYLEGAN3_ROOT, else
# ../shared/official/{stylegan2-ada-pytorch,stylegan3} when they exist (tests work on copies; without a
# checkout those tests skip and say how to run them).
#   bash scripts/test.sh [oldest|newest|today ...]      (default: oldest newest)
# Interpreters: $PYTHON_311 and $PYTHON_313, else pyenv's newest 3.11 and 3.13, else python3.11 and python3.13.
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
    echo "no Python $1 found: install it or set PYTHON_${1/./}" >&2; return 1
}

lower_bounds() {  # setup.cfg's install_requires lower bounds as exact pins: what the "oldest" environment installs
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

changes_nothing() {  # changes_nothing VENV: installing rtm-mapping into it would install nothing but rtm-mapping
    local venv=$1
    "$venv/bin/python" -m pip install -q --dry-run --report "$venv/install-report.json" "$repo" > "$venv/dry-run.log" 2>&1 \
        || { tail -n 20 "$venv/dry-run.log"; return 1; }
    "$venv/bin/python" - "$venv/install-report.json" <<'PY'
import json, sys
names = sorted(item['metadata']['name'] for item in json.load(open(sys.argv[1]))['install'])
others = [name for name in names if name.lower().replace('_', '-') != 'rtm-mapping']
print('pip install rtm-mapping would install:', ', '.join(names))
sys.exit(f'installing rtm-mapping would change {", ".join(others)} in this environment' if others else 0)
PY
}

offline_install() {  # offline_install VENV: the README's offline install: a wheel built here, installed with no index
    local venv=$1 python=$1/bin/python
    rm -rf "$venv/dist"
    "$python" -m pip wheel -q --no-deps -w "$venv/dist" "$repo" > "$venv/wheel.log" 2>&1 || { tail -n 20 "$venv/wheel.log"; return 1; }
    "$python" -m pip freeze --exclude rtm-mapping > "$venv/before.txt"
    (cd "$venv/dist" && env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
        "$python" -m pip install --no-index rtm_mapping-*.whl) > "$venv/offline.log" 2>&1 || { tail -n 20 "$venv/offline.log"; return 1; }
    "$python" -m pip freeze --exclude rtm-mapping | diff "$venv/before.txt" - || { echo 'the offline install changed the packages above' >&2; return 1; }
    echo "offline install: $(grep -o 'Successfully installed.*' "$venv/offline.log"), nothing else changed"
}

run_env() {  # run_env NAME PYTHON PIP_ARGS...: build the environment, then check and test in it
    local name=$1 python=$2; shift 2
    local venv="$repo/.venv-$name" start=$SECONDS
    echo "=== $name: $("$python" --version)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "$@" > "$venv/pip.log" 2>&1 || { tail -n 40 "$venv/pip.log"; return 1; }
    "$venv/bin/python" -c 'import sys, torch, numpy, scipy; print("python", sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__, "scipy", scipy.__version__)'
    echo "installed in $((SECONDS - start)) s"
    changes_nothing "$venv"
    if [ "$name" = newest ]; then "$venv/bin/python" -m pip uninstall -q -y rtm-mapping && offline_install "$venv"; fi
    "$venv/bin/python" -m ruff check .
    local TIMEFORMAT="=== $name: suite in %0R s (CPU: %0U s user, %0S s system; wall time depends on the machine's load)"
    time (cd "$repo" && env -u VIRTUAL_ENV PATH="/usr/bin:/bin" "$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=10)
}

envs=("$@")
[ ${#envs[@]} -gt 0 ] || envs=(oldest newest)
for env in "${envs[@]}"; do
    case $env in
        oldest|today)
            python=$(interpreter 3.11 "${PYTHON_311:-}")
            constraints=$(mktemp)
            lower_bounds "$python" > "$constraints"
            if [ "$env" = today ]; then sed -i 's/^torch==.*/torch==2.13.0/' "$constraints"; fi
            run_env "$env" "$python" -c "$constraints" torch -e ".[test]" ;;
        newest)
            python=$(interpreter 3.13 "${PYTHON_313:-}")
            run_env newest "$python" --upgrade torch numpy scipy setuptools ".[test]" ;;
        *) echo "unknown environment $env: use oldest, newest or today" >&2; exit 2 ;;
    esac
done
