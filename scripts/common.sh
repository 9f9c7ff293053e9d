# Sourced by run_standalone.sh and run_distribute.sh.
# resolve_config CONFIG: sets CONFIG to CONFIG itself if it is a file, else to the one yaml of that name among the
# installed knowlm configs (as MindFormers' KnowLM page names them: run_knowlm_13b.yaml); exits 2 otherwise.
resolve_config() {
  CONFIG=$1
  [ -f "$CONFIG" ] && return 0
  local python dir found
  python=$(dirname "$(command -v "$KNOWLM")")/python
  [ -x "$python" ] || python=python3
  # find_spec locates the package without importing it (MindFormers prints warnings on import).
  dir=$("$python" -c 'import importlib.util as u; print(u.find_spec("knowlm").submodule_search_locations[0])' \
        2>/dev/null)/configs
  found=$(find "$dir" -name "$(basename "$CONFIG")" -type f 2>/dev/null | sort)
  if [ -z "$found" ] || [ "$(printf '%s\n' "$found" | wc -l)" -ne 1 ]; then
    echo "$(basename "$0"): $1: config not found; expected a yaml file, or the name of one in $dir" >&2
    exit 2
  fi
  CONFIG=$found
}
# check_args ARGS...: sets CHECK_ARGS to the options of `knowlm finetune` that shape the config
# (--data, --base, --output-dir, --set), which `knowlm check-config` takes too.
check_args() {
  CHECK_ARGS=()
  local args=("$@") i
  for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
      --data|--base|--output-dir|--set) CHECK_ARGS+=("${args[i]}" "${args[i + 1]:-}"); i=$((i + 1)) ;;
      --data=*|--base=*|--output-dir=*|--set=*) CHECK_ARGS+=("${args[i]}") ;;
    esac
  done
}
