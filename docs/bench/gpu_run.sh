#!/bin/bash
# The GPU figures, run on a lent GPU machine (Python 3.12 with CUDA torch, no network) from the repo root.
# It needs the .gl EGL loader debs and .devcarry/bundle.tar.xz (pyzmq, gymnasium, ale-py, mujoco, ...
# as cp312 wheels plus a slimmed dm_control; see docs/RESULTS.md "GPU figures") carried beside the tree.
# Making the bundle here (the versions of .venv; dm_control's wheel is 56 MB, so it travels unpacked
# without locomotion/, suite/dog_assets/ and blender/):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 ... -d wheels pyzmq gymnasium Farama-Notifications ale-py \
#     dm-env dm-tree labmaze mujoco glfw PyOpenGL        (and dm_control, unzipped into site/)
#   tar cf - site wheels | xz > .devcarry/bundle.tar.xz
# The .gl debs: `apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2`.
# Every step is time-boxed so one failure still leaves the others' output in $OUT.
# VARIANTS=1 runs only the shard-count / broadcast-period comparison.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export __EGL_VENDOR_LIBRARY_FILENAMES=${__EGL_VENDOR_LIBRARY_FILENAMES:-/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json}
[ -f "$__EGL_VENDOR_LIBRARY_FILENAMES" ] || unset __EGL_VENDOR_LIBRARY_FILENAMES
mkdir -p /tmp/dc && tar xJf .devcarry/bundle.tar.xz -C /tmp/dc
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/dc/wheels/*.whl
cp -r /tmp/dc/site/* /tmp/site/
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MUJOCO_GL=egl
{ nvidia-smi -L; nproc; python3 -c "import torch, zmq, mujoco; print(torch.__version__, torch.cuda.get_device_name(0), zmq.zmq_version(), mujoco.__version__)"; } 2>&1 | tee "$OUT/env.txt"
t0=$SECONDS
python3 setup.py -q build_ext --inplace -j 8 > "$OUT/build.log" 2>&1 || { echo BUILD FAILED; tail -20 "$OUT/build.log"; }
echo "build took $((SECONDS - t0)) s"
G="python3 -m gorila_zmq.cli"
if [ -n "${VARIANTS:-}" ]; then    # shard count and broadcast period, each with its baseline in the same run
  for o in "ps.shards=1" "ps.shards=4"; do
    timeout 100 $G bench learner --device cuda --updates 1500 $o 2>&1 | grep -E "updates/s|ratio|note"; done
  for o in "ps.shards=4 ps.broadcast_every=1" "ps.shards=4 ps.broadcast_every=4 ps.broadcast_interval_ms=100"; do
    timeout 120 $G bench drqv2 --device cuda --batch 256 --updates 150 --env-steps 10 $o 2>&1 | grep -E "updates/s|ratio|note"; done
  echo "total $SECONDS s"; exit 0
fi
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_dqn_units.py -k staging 2>&1 | tail -3
timeout 120 $G bench learner --device cuda --updates ${LEARNER_UPDATES:-1000} --json "$OUT/learner_gpu.json" 2>&1 | tee "$OUT/learner_gpu.txt" | tail -14
timeout 150 $G bench drqv2 --device cuda --batch 256 --updates ${DRQ_UPDATES:-150} --env-steps ${DRQ_ENV_STEPS:-500} --json "$OUT/drqv2_gpu.json" 2>&1 | tee "$OUT/drqv2_gpu.txt" | tail -16
if [ -n "${DRQ_SHARDS:-}" ]; then     # the same with the Adam shard split over several processes
  timeout 150 $G bench drqv2 --device cuda --batch 256 --updates ${DRQ_UPDATES:-150} --env-steps 20 ps.shards=$DRQ_SHARDS --json "$OUT/drqv2_gpu_shards.json" 2>&1 | tee "$OUT/drqv2_gpu_shards.txt" | grep -E "updates/s|ratio|note"
fi
D=${DRQ_SECONDS:-180}
timeout $((D + 60)) $G dev --agent drqv2 --env cartpole_swingup --duration $D run.run_dir=/tmp/gpu-drq \
    agent.batch_size=256 env.fast_render=false roles.actors=${DRQ_ACTORS:-4} roles.evaluator=false \
    dev.progress_interval_s=10 ${DEV_OVERRIDES:-} > "$OUT/dev_drqv2_gpu.log" 2>&1
grep -E "^gorila-zmq dev|frames" "$OUT/dev_drqv2_gpu.log" | tail -14
echo "total $SECONDS s"
