# Sourced by the launch scripts. With GRADVAC_DRY_RUN=1 a script prints each command it would run
# (shell-quoted, one line each) instead of running it, and starts nothing.
dry_run() { [ -n "${GRADVAC_DRY_RUN:-}" ]; }
# run CMD...: one step of the script
run() { if dry_run; then printf '%q ' "$@"; echo; else "$@"; fi; }
# launch CMD...: the script's last step, which replaces the script's process (exec)
launch() { if dry_run; then run "$@"; exit 0; fi; exec "$@"; }
