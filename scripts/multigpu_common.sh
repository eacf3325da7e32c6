# Sourced by scripts/multigpu_check*.sh: what every multi-GPU check sets and uses.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # no NVLink multicast
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
PHASES=" ${*:-all} "
# archirf.train with deterministic kernels (bitwise relaunch comparisons)
DET='import sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); from archirf.train import main; sys.exit(main())'

run_det() {    # run_det NPROC LOG ARGS...: archirf.train with deterministic kernels
  local n=$1 log=$2; shift 2
  CUBLAS_WORKSPACE_CONFIG=:4096:8 torchrun --standalone --nproc_per_node="$n" --no-python python -c "$DET" "$@" \
    > "$log" 2>&1
}

rank_pid() {   # rank_pid LAUNCHER_PID RANK: a torchrun worker's pid
  for pid in $(pgrep -P "$1"); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "RANK=$2"; then echo "$pid"; return; fi
  done
}

stop_rank1() { # stop_rank1 LOG RUN_DIR LINES ARGS...: a deterministic 2-GPU archirf.train run; once its metrics have
               # LINES lines, SIGTERM to rank 1 only; waits; prints "exit CODE, pid PID"
  local log=$1 dir=$2 lines=$3; shift 3
  rm -rf "$dir"                        # a fresh run: an old one's metrics would end the wait at once
  CUBLAS_WORKSPACE_CONFIG=:4096:8 torchrun --standalone --nproc_per_node=2 --no-python python -c "$DET" \
    "$@" run_dir="$dir" parallel.stop_check_steps=5 > "$log" 2>&1 &
  local launcher=$!
  until [ -f "$dir/metrics.jsonl" ] && [ "$(wc -l < "$dir/metrics.jsonl")" -ge "$lines" ]; do
    kill -0 $launcher 2>/dev/null || break
    sleep 0.2
  done
  local pid1; pid1=$(rank_pid $launcher 1)
  if [ -n "$pid1" ]; then kill -TERM "$pid1"; fi
  wait $launcher; echo "exit $?, pid ${pid1:-none}"
}
