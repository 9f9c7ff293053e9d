# Sourced by run_standalone.sh and run_distribute.sh.
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
