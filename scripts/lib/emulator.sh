# Sourced by the scripts that start acs-emulator (the Rust side is acs_emulator::process). It
# prints one line on stdout once it accepts connections, `endpoint=<url>/;accesskey=<key>`,
# which is what this reads; its log goes to stderr.
#
# emulator_start NAME DIR BIN ARGS...: starts `BIN --listen 127.0.0.1:0 ARGS...` with its first
# line in DIR/NAME.out (mode 600: it holds the key) and its log in DIR/NAME.log, and waits up to
# 30 s for that line. Sets emulator_pid, emulator_connection_string and emulator_endpoint (no
# trailing /); returns 1, with the log on stderr, when it exits first or prints nothing (then
# stopped).
emulator_start() {
  local name=$1 dir=$2 bin=$3
  shift 3
  local out=$dir/$name.out log=$dir/$name.log
  (umask 077 && exec "$bin" --listen 127.0.0.1:0 "$@" >"$out" 2>"$log") &
  emulator_pid=$!
  local _
  for _ in $(seq 1 300); do
    # A whole line (the emulator flushes it with its newline) means it is accepting.
    if [[ -s $out && $(wc -l <"$out") -ge 1 ]]; then
      emulator_connection_string=$(head -n 1 "$out")
      emulator_endpoint=$(sed -n 's/^endpoint=\([^;]*\)\/;.*/\1/p' <<<"$emulator_connection_string")
      return 0
    fi
    if ! kill -0 "$emulator_pid" 2>/dev/null; then
      echo "acs-emulator ($name) exited before it was ready:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.1
  done
  kill "$emulator_pid" 2>/dev/null || true
  echo "acs-emulator ($name) printed no connection string within 30 s; see $log" >&2
  return 1
}
